"""The unit's side of the watchlist: the verified store, live apply, and the MQTT subscriber."""
