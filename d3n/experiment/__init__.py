"""`d3n experiment`: a matrix of pipeline variants x seeds, shared stages run once, and the statistics
that say whether a difference is more than seed noise."""
