"""Results: versioned JSON (the source of truth), markdown tables and PNG plots."""
