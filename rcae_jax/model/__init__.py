"""Pure Flax linen modules (the shared encoder / decoder step and its
recursion, DPN, CRD), the forward pass every mode runs, the losses and FLOP
counting. No I/O, no optax, no Orbax; imports common/ and data/ geometry
only."""
