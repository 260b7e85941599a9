"""Rules and maths of the control plane: no aiohttp, no SQL, no import of the store (functions
that read or write receive a store)."""
