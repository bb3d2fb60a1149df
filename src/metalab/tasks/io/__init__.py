"""Reading data sets from their standard on-disk forms, and the uint8 image cache."""
