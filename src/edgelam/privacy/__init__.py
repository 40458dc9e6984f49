"""Privacy mechanisms for federated rounds: secure aggregation (Bonawitz et al. 2017) over Shamir sharing."""
