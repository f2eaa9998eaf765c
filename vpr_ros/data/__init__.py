"""Place data: the one place-set type (database, queries, ground truth) and the readers that build it."""
