"""fastsiam."""
