"""The stage runner of tca4rec and the thin per-stage glue around `tca/`."""
