"""Training: the RGB stage and (later) the language stage."""
