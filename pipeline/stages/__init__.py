"""One module per stage: reads inputs, calls `tca/`, writes into `ctx.out`. I/O glue only."""
