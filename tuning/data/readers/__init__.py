"""One reader per family of data formats; tuning.data.formats detects which one a record needs."""
