"""fabwatch training side (TensorFlow / tf_keras). Import ``models.tf`` for TensorFlow itself, so the
legacy-Keras switch is always set before TensorFlow loads."""
