"""``jax.shard_map`` parallelism: meshes and logical-axis rules, tensor (Megatron),
sequence (ring / Ulysses), pipeline (GPipe / 1F1B), data / FSDP and vocabulary parallelism,
and a sharded functional forward of :class:`jaxeff.models.gpt.GPT`."""
