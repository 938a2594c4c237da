"""LoRAs: where a reference points (`refs`), getting its bytes (`fetch`), reading any FLUX LoRA layout
into per-module deltas (`formats`, `flux_layout`, `lycoris`), and fusing them exactly (`fuse`).
`LoraManager` (`manager`) ties them together for the engine."""
