"""The ground floor of every structured method: what a unit is (:mod:`.layers`, :mod:`.groups`), where a
per-unit multiplier attaches (:mod:`.sites`; the Taylor gate of :mod:`.gates`, BMRS noise and DLLP particle
gates are three kinds of multiplier on these sites) and how pruned units are removed physically
(:mod:`.compact`). See docs/architecture.md."""
