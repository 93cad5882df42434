"""The model: architecture config, sharding rules, parameter declarations, layers, transformer, initialisation."""
