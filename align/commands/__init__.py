"""The commands that drive the stages: the `align` CLI, the end-to-end demo and export.

`align/` itself is the ground every stage stands on (config, errors, formats, chat, modeling,
run, generation, the synthetic task, the demo model); this package is the roof above the
stages (`annotation`, `reward`, `ppo`) and the only part of `align` that imports them.
"""
