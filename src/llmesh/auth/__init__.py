"""Request authentication shared by the client SDK and the gateway (HMAC request signatures)."""
