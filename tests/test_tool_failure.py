"""Issue 22, item 8: a failed tool is reported in one line: its cause and its log.

The pure rules here; through invoke's command line (a quantize under a file-size limit, a
converter failure in `invoke reproduce`) in test_faults.py.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from moeprune.llamacpp.process import ToolError, failure_line, last_error_line, no_output_error, run_logged

LOG = Path("/runs/demo/logs/convert-base.log")
CONVERTER_OUTPUT = """INFO:hf-to-gguf:Loading model: model
Traceback (most recent call last):
  File "/llama.cpp/convert_hf_to_gguf.py", line 12000, in <module>
    main()
  File "/llama.cpp/convert_hf_to_gguf.py", line 11950, in main
    model_architecture = get_model_architecture(hparams, model_type)
                         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
KeyError: 'architectures'
"""


def test_a_python_traceback_gives_its_exception_line():
    assert last_error_line(CONVERTER_OUTPUT) == "KeyError: 'architectures'"
    line = failure_line("convert_hf_to_gguf.py", 1, CONVERTER_OUTPUT, LOG)
    assert line == f"convert_hf_to_gguf.py failed: KeyError: 'architectures' (exit 1); log: {LOG}"


def test_a_c_tool_gives_its_last_error_line():
    output = ("main: build = 1\nllama_model_quantize: failed to quantize: tensor 'x' has invalid data\n"
              "main: failed to quantize model from 'in.gguf'\nmain: total time = 3 ms\n")
    assert last_error_line(output) == "main: failed to quantize model from 'in.gguf'"
    assert last_error_line("just one line\n") == "just one line"
    assert last_error_line("") is None
    assert last_error_line("error: " + "x" * 1000).endswith("...")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no SIGXFSZ on this platform")
def test_a_file_size_limit_names_the_signal_and_the_file_being_written():
    out = Path("/runs/demo/gguf/base-Q4_K_M.gguf")
    line = failure_line("llama-quantize", -signal.SIGXFSZ, "[ 12/ 80] blk.1.ffn_up_exps.weight\n", LOG, writing=out)
    assert line == (f"llama-quantize killed by SIGXFSZ (signal {int(signal.SIGXFSZ)}: file-size limit reached "
                    f"writing {out}); log: {LOG}")


def test_a_full_disk_and_other_signals_are_named():
    full = "blk.3 ...\nllama_model_quantize: failed to quantize: basic_ios::clear: No space left on device\n"
    assert failure_line("llama-quantize", 1, full, LOG) == (
        f"llama-quantize failed: disk full (No space left on device) (exit 1); log: {LOG}")
    assert failure_line("llama-imatrix", -9, "", None) == "llama-imatrix killed by SIGKILL (signal 9)"
    assert failure_line("x", 1, "OSError: [Errno 27] File too large\n", LOG).startswith(
        "x failed: file-size limit reached (File too large) (exit 1)")
    assert failure_line("x", 2, "", LOG, log_problem="the log L could not be written (disk full)") == (
        "x failed: no output (exit 2); the log L could not be written (disk full)")


def test_run_logged_raises_one_line_and_keeps_the_whole_output_in_the_log(tmp_path):
    log = tmp_path / "logs" / "tool.log"
    script = "import sys\nfor i in range(40): print('step', i)\nraise SystemExit('tool: cannot read input.bin')"
    with pytest.raises(ToolError) as caught:
        run_logged([sys.executable, "-c", script], log, "tool")
    assert str(caught.value) == f"tool failed: tool: cannot read input.bin (exit 1); log: {log}"
    text = log.read_text()
    assert "step 0" in text and "step 39" in text and "cannot read input.bin" in text
    assert run_logged([sys.executable, "-c", "print('fine')"], log, "tool") == "fine\n"
    assert str(no_output_error("tool", "", tmp_path / "out.gguf", log)) == (
        f"tool exited 0 but wrote no out.gguf; log: {log}")
