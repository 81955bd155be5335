"""`invoke reproduce`: the stage graph, its lock file and its progress view."""
