"""Local stand-ins for production servers (Kafka broker, Triton), started by PID on free ports."""
