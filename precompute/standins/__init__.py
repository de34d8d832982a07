"""The `shapes` world's stand-ins for Prismer's label experts: the real architectures at tiny size,
trained briefly on what the world's renderer knows exactly (depth order, class masks, boxes), so
the labels they write into the cache mean something. They are saved in their libraries' own
formats and loaded by path by the real experts, like published checkpoints."""
