"""The embedded tiny FLUX.1 Kontext (test and demo infrastructure): its builder, its pretraining recipe, its committed weights."""
