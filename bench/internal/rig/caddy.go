package rig

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// Caddyfile is a whole configuration: the site on listen, the limiter
// block (possibly empty), reverse_proxy to upstream. The global options
// keep Caddy in-process, quiet and on loopback, as caddytest's harness does.
func Caddyfile(listen, upstream, limiter string, verbose bool) string {
	var b strings.Builder
	b.WriteString("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n\tgrace_period 5s\n")
	if !verbose {
		b.WriteString("\tlog {\n\t\toutput discard\n\t}\n")
	}
	b.WriteString("}\n\n")
	fmt.Fprintf(&b, "%s {\n%s\treverse_proxy %s\n}\n", listen, limiter, upstream)
	return b.String()
}

// PrintConfig prints, under "# title", the Caddyfile of limiter with
// placeholder ports and whether it adapts; notAdapted is how the line
// starts when it does not.
func PrintConfig(w io.Writer, title, limiter string, verbose bool, notAdapted string) {
	fmt.Fprintf(w, "# %s\n", title)
	cf := Caddyfile(":8080", "127.0.0.1:8081", limiter, verbose)
	fmt.Fprint(w, cf)
	if _, err := Adapt(cf); err != nil {
		fmt.Fprintf(w, "# %s: %v\n\n", notAdapted, err)
	} else {
		fmt.Fprint(w, "# adapts: ok\n\n")
	}
}

// LoadCaddy adapts a Caddyfile and loads it into the process's Caddy; the
// error says which of the two failed.
func LoadCaddy(cf string) error {
	cfg, err := Adapt(cf)
	if err != nil {
		return fmt.Errorf("the Caddyfile does not adapt: %w", err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		return fmt.Errorf("caddy.Load: %w", err)
	}
	return nil
}

// StopCaddy stops the process's Caddy, and says so on stderr, after prog,
// when that fails.
func StopCaddy(prog string) {
	if err := caddy.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: stopping caddy: %v\n", prog, err)
	}
}

// Upstream returns fakellm's host:port, for reverse_proxy.
func Upstream(fake *fakellm.Server) string { return strings.TrimPrefix(fake.URL, "http://") }

// ChatURL is the chat completions endpoint of a Caddy listening on port.
func ChatURL(port int) string {
	return fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", port)
}

// Stack is a fresh fakellm and, in front of it, the process's Caddy.
type Stack struct {
	// Fake is the upstream. It records each request's arrival and status
	// (0 for a hung request), and the most requests inside its handler at
	// once.
	Fake *fakellm.Server
	URL  string // Caddy's chat completions endpoint
	prog string
}

// Start starts fakellm with cfg, then loads into the process's Caddy, on a
// free loopback port, a site that runs limiter (a Caddyfile block, possibly
// empty) then reverse_proxy to fakellm. prog starts the line Close prints
// if Caddy fails to stop. When Start fails, nothing is left running.
func Start(prog string, cfg fakellm.Config, limiter string, verbose bool) (*Stack, error) {
	fake, err := fakellm.Start(cfg)
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err == nil {
		err = LoadCaddy(Caddyfile(fmt.Sprintf(":%d", port), Upstream(fake), limiter, verbose))
	}
	if err != nil {
		fake.Close()
		return nil, err
	}
	return &Stack{Fake: fake, URL: ChatURL(port), prog: prog}, nil
}

// Close stops Caddy, then fakellm, whose Close aborts its slow streams and
// hung requests and waits for every handler, so nothing outlives the run.
func (s *Stack) Close() {
	StopCaddy(s.prog)
	s.Fake.Close()
}
