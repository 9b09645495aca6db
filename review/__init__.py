"""The human side: review sink (topic -> Redis), review console, dataset sink, Label Studio interop."""
