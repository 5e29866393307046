"""Use cases of the control plane: one function per command, no Flask in here."""
