"""Hamilton modules that define the turn DAG, one module per stage family."""
