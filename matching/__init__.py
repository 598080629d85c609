"""The watchlist matcher: a quantised template index and the best-person search (numpy only)."""
