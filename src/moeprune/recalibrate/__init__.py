"""Router recalibration after pruning: fit the kept router parameters so each pruned MoE block's
output matches the base block's on the calibration hidden states (issue 24, item 1)."""

RECORD_NAME = "recalibrate.json"  # the record beside the recalibrated weights
