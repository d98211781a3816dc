"""What happens to alerts after the processor publishes them: routing to the receivers operators use."""
