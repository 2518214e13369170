// Package caddytest holds the end-to-end tests of llm_rate_limit: they run
// Caddy in-process with the module loaded, in front of the fake LLM upstream
// of package fakellm, and assert on what clients and the upstream see.
//
// The tests share Caddy, a process-wide singleton, and so never run in
// parallel with each other.
package caddytest
