"""Framework backends: each translates layouts and calls into the reference's conventions."""
