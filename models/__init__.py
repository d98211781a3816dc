"""fabwatch training side (TensorFlow / tf_keras). Import ``fabwatch.models.tf`` for TensorFlow itself, so the
legacy-Keras switch is always set before TensorFlow loads."""
