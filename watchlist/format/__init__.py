"""What the watchlist is on the wire and on disk: canonical encoding, keys, bundles, verification."""
