// Command caddy is Caddy with the llm_rate_limit module (and Caddy's
// standard modules) compiled in, for development and the benchmark scripts.
// Operators build their own Caddy with xcaddy instead; see the README.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/llmratelimit/caddy-llm-ratelimit"
)

func main() {
	caddycmd.Main()
}
