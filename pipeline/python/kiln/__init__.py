"""kiln's Python side: Flux-class model definitions for torch.export, the seeded flux-tiny
repository generator, and the kiln-compile tool (AOTInductor packages without weights)."""
