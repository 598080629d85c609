"""What tests, benchmarks and the demo share: media, an RTSP server, a Mosquitto broker, HQ simulation."""
