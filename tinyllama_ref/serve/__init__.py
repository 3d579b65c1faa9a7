"""An HTTP server that speaks TGI's and OpenAI's APIs, with continuous batching (extra: [serve])."""
