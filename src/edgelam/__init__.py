"""EdgeLAM: federated fine-tuning and collaborative serving of large AI models at the wireless edge."""

__version__ = "0.1.0"
