"""The operators' side: receives hits and unit status from many units."""
