"""fabwatch serving side: everything that touches Kafka at run time. Never imports TensorFlow."""
