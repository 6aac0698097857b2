"""What the two HTTP adapters (the JSON API and the web UI) share: how a domain error reads as an HTTP answer."""
