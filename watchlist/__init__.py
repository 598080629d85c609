"""The signed watchlist: HQ tools that build and publish it, the unit's side that verifies and applies it."""
