package caddytest

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// Invalid Caddyfiles are refused with a message that says what is wrong.
func TestInvalidCaddyfiles(t *testing.T) {
	rule := func(body string) string {
		return "rule r {\n" + body + "\n}"
	}
	cases := []struct {
		name, block string
		want        []string
	}{
		{"unknown unit", rule("limit 5 requests_per_fortnight"),
			[]string{`rule r: unknown unit "requests_per_fortnight": want one of concurrent_requests, requests_per_day, requests_per_hour`}},
		{"unknown unit in limit tokens", rule("limit 5 token_per_minute"),
			[]string{`unknown unit "token_per_minute"`}},
		{"limit 0", rule("limit 0 requests_per_minute"),
			[]string{`rule r: limit "0": want a positive whole number`}},
		{"limit negative", rule("limit -3 requests_per_minute"),
			[]string{`rule r: limit "-3": want a positive whole number`}},
		{"limit not a number", rule("limit lots requests_per_minute"),
			[]string{`rule r: limit "lots": want a positive whole number`}},
		{"shorthand rpm 0", "model gpt-4o {\nrpm 0\n}",
			[]string{`model gpt-4o: limit "0": want a positive whole number`}},
		{"burst without number", rule("limit 5 requests_per_minute burst"),
			[]string{`rule r: want limit <n> <unit> [burst <n>]`}},
		{"shorthand burst without number", "model gpt-4o {\nrpm 5 burst\n}",
			[]string{`model gpt-4o: want rpm <n> [burst <n>]`}},
		{"burst 0", rule("limit 5 requests_per_minute burst 0"),
			[]string{`rule r: burst "0": want a positive whole number`}},
		{"not burst", rule("limit 5 requests_per_minute bursts 3"),
			[]string{`rule r: unexpected "bursts" after the unit: want burst <n>`}},
		{"unknown subdirective", "frobnicate yes",
			[]string{`unrecognized llm_rate_limit subdirective "frobnicate"`}},
		{"unknown rule subdirective", rule("limit 5 requests_per_minute\nwindow 1m"),
			[]string{`rule r: unrecognized subdirective "window": want when, limit, applies_per, mode or queue`}},
		{"when in a model block", "model gpt-4o {\nrpm 5\nwhen {\nmodels x\n}\n}",
			[]string{`model gpt-4o: unrecognized subdirective "when"`}},
		{"rule without limits", rule("applies_per user"),
			[]string{`rule r: no limits: a rule needs at least one limit`}},
		{"model without limits", "model gpt-4o {\nmode shadow\n}",
			[]string{`model gpt-4o: no limits: a rule needs at least one limit`}},
		{"duplicate rule id", rule("limit 1 requests_per_minute") + "\n" + rule("limit 2 requests_per_minute"),
			[]string{`rule "r": duplicate id`}},
		{"duplicate model", "model m {\nrpm 1\n}\nmodel m {\nrpm 2\n}",
			[]string{`rule "model:m": duplicate id`}},
		{"two limits with one unit", rule("limit 1 requests_per_minute\nlimit 2 requests_per_minute"),
			[]string{`two limits with unit requests_per_minute`}},
		{"unknown applies_per dimension", rule("limit 1 requests_per_minute\napplies_per user planet"),
			[]string{`rate_limit_applies_per: unknown dimension "planet", want user, team, virtualaccount, model or metadata.KEY`}},
		{"applies_per metadata without key", rule("limit 1 requests_per_minute\napplies_per metadata."),
			[]string{`unknown dimension "metadata."`}},
		{"applies_per twice", rule("limit 1 requests_per_minute\napplies_per user user"),
			[]string{`rate_limit_applies_per: "user" listed twice`}},
		{"bad subject kind", rule("when {\nsubjects org:acme\n}\nlimit 1 requests_per_minute"),
			[]string{`subject: unknown kind "org", want user, team or virtualaccount`}},
		{"subject without kind", rule("when {\nsubjects alice\n}\nlimit 1 requests_per_minute"),
			[]string{`subject of kind "alice" has no value: want user:NAME, team:NAME or virtualaccount:NAME`}},
		{"bad sha256 subject", rule("when {\nsubjects virtualaccount:sha256:xyz\n}\nlimit 1 requests_per_minute"),
			[]string{`sha256: must be followed by the 64 (or first 32) hex digits`}},
		{"mode other", rule("limit 1 requests_per_minute\nmode dryrun"),
			[]string{`rule r: mode "dryrun": want enforce or shadow`}},
		{"shorthand mode other", "model m {\nrpm 1\nmode log\n}",
			[]string{`model m: mode "log": want enforce or shadow`}},
		{"concurrency with a burst", rule("limit 4 concurrent_requests burst 2"),
			[]string{`limit 4 concurrent_requests: a concurrency limit has no burst`}},
		{"queue max_wait garbage", "queue {\nmax_wait soon\n}",
			[]string{`queue: max_wait "soon": want a duration such as 30s, or 0 to refuse at once`}},
		{"queue max_wait negative", "queue {\nmax_wait -3s\n}",
			[]string{`queue: max_wait "-3s"`}},
		{"queue max_depth 0", "queue {\nmax_depth 0\n}",
			[]string{`queue: max_depth "0": want a positive whole number`}},
		{"queue twice", "queue\nqueue",
			[]string{`queue specified more than once`}},
		{"queue unknown option", "queue {\nmax_size 3\n}",
			[]string{`queue: unrecognized option "max_size"`}},
		{"queue fair_by unknown", "queue {\nfair_by planet\n}",
			[]string{`queue: fair_by: rate_limit_applies_per: unknown dimension "planet"`}},
		{"priority without source", "queue {\npriority\n}",
			[]string{`queue: priority needs a placeholder or metadata.KEY`}},
		{"priority class not a number", "queue {\npriority {http.request.header.X-P} {\nhigh top\n}\n}",
			[]string{`queue: priority class of "high": "top" is not a whole number`}},
		{"priority class out of range", "queue {\npriority {http.request.header.X-P} {\nhigh 5000\n}\n}",
			[]string{`queue: priority class "high" is 5000, want between -1000 and 1000`}},
		{"weight out of range", "queue {\nweight metadata.tier {\ngold 0\n}\n}",
			[]string{`queue: weight of "gold" is 0, want between 0.001 and 1000`}},
		{"weight not a number", "queue {\nweight metadata.tier {\ngold lots\n}\n}",
			[]string{`queue: weight of "gold": "lots" is not a number`}},
		{"rule queue with priority", rule("limit 1 requests_per_minute\nqueue {\npriority {http.request.header.X-P}\n}"),
			[]string{`rule r: queue: unrecognized option "priority": a rule's queue takes max_wait and max_depth`}},
		{"max_body garbage", "max_body lots",
			[]string{`max_body: invalid size "lots": want a positive size such as 16MiB`}},
		{"max_body 0", "max_body 0",
			[]string{`max_body: invalid size "0"`}},
		{"max_body twice", "max_body 1MiB\nmax_body 2MiB",
			[]string{`max_body specified more than once`}},
		{"when unknown condition", rule("when {\npaths /v1/*\n}\nlimit 1 requests_per_minute"),
			[]string{`rule r: unrecognized when condition "paths": want subjects, models or metadata`}},
		{"when condition without values", rule("when {\nmodels\n}\nlimit 1 requests_per_minute"),
			[]string{`rule r: when models needs at least one value`}},
		{"metadata without =", rule("when {\nmetadata env\n}\nlimit 1 requests_per_minute"),
			[]string{`rule r: metadata "env": want key=value`}},
		{"rule id with a quote", "rule a\"b {\nlimit 1 requests_per_minute\n}",
			[]string{`must be 1 to 128 printable ASCII characters`}},
		{"rule without id", "rule {\nlimit 1 requests_per_minute\n}",
			[]string{`rule needs exactly one argument, its id`}},
		{"argument on the directive", "",
			[]string{`wrong argument count`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			directive := "llm_rate_limit {\n" + c.block + "\n}"
			if c.name == "argument on the directive" {
				directive = "llm_rate_limit extra {\n}"
			}
			cf := withGlobalOptions(":1 {\n" + directive + "\nrespond ok\n}\n")
			_, err := adapt(cf)
			if err == nil {
				t.Fatalf("adapting succeeded, want an error containing %q", c.want)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

// JSON configs skip the Caddyfile parser: Provision and Validate must catch
// the same mistakes, and a refused config leaves the running one serving.
func TestInvalidJSONConfigKeepsRunningConfig(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule keep {
			limit 100 requests_per_hour
		}`, up)
	r := h.chat("gpt-4o")
	wantStatus(t, "before", r, http.StatusOK)
	wantRemaining(t, "before", r, map[string]int64{"keep/requests_per_hour": 99})

	handler := func(fields string) []byte {
		return []byte(fmt.Sprintf(`{"admin":{"disabled":true},"apps":{"http":{"servers":{"s":{"listen":["127.0.0.1:%d"],
			"routes":[{"handle":[{"handler":"llm_rate_limit",%s},{"handler":"static_response","body":"new"}]}]}}}}}`, h.port, fields))
	}
	cases := []struct{ name, fields, want string }{
		{"limit 0", `"rules":[{"id":"x","limits":[{"limit_to":0,"unit":"requests_per_minute"}]}]`, `limit must be positive`},
		{"unknown unit", `"rules":[{"id":"x","limits":[{"limit_to":1,"unit":"requests_per_week"}]}]`, `unknown unit "requests_per_week"`},
		{"no limits", `"rules":[{"id":"x"}]`, `no limits`},
		{"duplicate id", `"rules":[{"id":"x","limits":[{"limit_to":1,"unit":"requests_per_minute"}]},{"id":"x","limits":[{"limit_to":1,"unit":"requests_per_minute"}]}]`, `duplicate id`},
		{"empty id", `"rules":[{"id":"","limits":[{"limit_to":1,"unit":"requests_per_minute"}]}]`, `must be 1 to 128 printable ASCII characters`},
		{"bad mode", `"rules":[{"id":"x","mode":"audit","limits":[{"limit_to":1,"unit":"requests_per_minute"}]}]`, `mode "audit": want enforce or shadow`},
		{"bad dimension", `"rules":[{"id":"x","rate_limit_applies_per":["org"],"limits":[{"limit_to":1,"unit":"requests_per_minute"}]}]`, `unknown dimension "org"`},
		{"empty model", `"rules":[{"id":"x","when":{"models":[""]},"limits":[{"limit_to":1,"unit":"requests_per_minute"}]}]`, `empty model name`},
		{"negative burst", `"rules":[{"id":"x","limits":[{"limit_to":1,"unit":"requests_per_minute","burst":-1}]}]`, `burst must not be negative`},
		{"negative max_body", `"max_body":-1`, `max_body must be between 1 byte and 1 TiB`},
		{"unknown field", `"rulez":[]`, `unknown field "rulez"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := caddy.Load(handler(c.fields), true)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("load error %v, want one containing %q", err, c.want)
			}
			h.closeIdle()
			r := h.chat("gpt-4o")
			wantStatus(t, "still serving", r, http.StatusOK)
			if string(r.body) == "new" {
				t.Fatal("the refused config is serving")
			}
		})
	}
	// Failed loads did not disturb the state either: one request before,
	// one per case, and this one.
	r = h.chat("gpt-4o")
	wantRemaining(t, "after", r, map[string]int64{"keep/requests_per_hour": int64(100 - 2 - len(cases))})
}
