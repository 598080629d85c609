"""The unit's daemon: capture, detect, track, embed, match, report."""
