"""Small pieces every role shares: strict config models, atomic file writes, SQLite opening."""
