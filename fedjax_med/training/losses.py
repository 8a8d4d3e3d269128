from fedjax_med.models.losses import example_loss_fn, per_example_loss, probabilities  # noqa: F401
