"""Split federated LoRA: the model cut between devices and the edge server, trained over the air."""
