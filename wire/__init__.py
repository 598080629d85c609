"""What travels between roles: MQTT topics, the hit/status/heartbeat records, and the one MQTT link."""
