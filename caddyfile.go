package llmratelimit

import (
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"golang.org/x/net/http/httpguts"
)

// parseCaddyfile sets up the handler from Caddyfile tokens.
func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// shorthands are the per-model shorthand keywords and the units they stand for.
var shorthands = map[string]string{
	"rps": "requests_per_second",
	"rpm": "requests_per_minute",
	"rph": "requests_per_hour",
	"rpd": "requests_per_day",
	"tps": "tokens_per_second",
	"tpm": "tokens_per_minute",
	"tph": "tokens_per_hour",
	"tpd": "tokens_per_day",
	// Requests in flight, for a self-hosted server with a fixed number of
	// slots.
	"concurrent": "concurrent_requests",
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	llm_rate_limit {
//		# who is asking: placeholders; an empty value means no such subject
//		user            <placeholder>
//		team            <placeholder>
//		virtualaccount  <placeholder>     # hashed (SHA-256) before any use
//		metadata_header <header-name>     # a JSON object of string values
//
//		max_body  <size>                  # default 16MiB; larger bodies get 413
//		rules_file <path>                 # seed 003's YAML rules, read at provisioning; after the rules below
//
//		# token accounting for tokens_per_* limits (all optional)
//		tokens {
//			chars_per_token   <n>         # default 4; CJK counts 1 per character
//			completion_tokens <n>         # when the request names no max; default 1024
//			oversize admit|reject         # a request above a bucket's capacity; default admit
//			stream_usage                  # add stream_options.include_usage to OpenAI streams
//			model <name|prefix*> {
//				chars_per_token   <n>
//				completion_tokens <n>
//			}
//		}
//		zone      <name>                  # bucket namespace; default ""
//
//		# where bucket states live; default memory (this process)
//		store memory
//		store redis {                     # shared by every Caddy that uses it
//			address      <host:port...>   # default 127.0.0.1:6379; several: a Redis Cluster
//			cluster                       # a cluster even with one address
//			username     <name>
//			password     <secret>         # e.g. {env.REDIS_PASSWORD}
//			db           <n>              # default 0
//			key_prefix   <prefix>         # default llmrl; the keys' cluster hash tag
//			timeout      <duration>       # per call; default 50ms, then fail_mode applies
//			dial_timeout <duration>       # default 1s
//			pool_size    <n>              # default go-redis's (10 per CPU)
//			fail_mode    open|closed|local  # while Redis is down; default local
//			instances    <n>              # local mode divides every limit by n; default 1
//			tls {
//				server_name <name>
//				ca_file     <pem-file>
//				insecure_skip_verify
//			}
//		}
//		use_handle_errors                 # refusals go to handle_errors
//
//		# wait for a turn instead of a 429 (without it, refuse at once)
//		queue {
//			max_wait  <duration>          # default 30s; 0 refuses at once
//			max_depth <n>                 # requests waiting per bucket; default 10000
//			fair_by   <dimension...>      # fairness subject; default user, else virtualaccount, else team
//			priority  <placeholder|metadata.KEY> [{   # higher classes first; default 0
//				<value> <class>           # without a map, the value is read as an integer
//			}]
//			weight    <placeholder|metadata.KEY> [{   # a subject's share; default 1
//				<value> <weight>          # without a map, the value is read as a number
//			}]
//		}
//
//		# learn the upstream's limits from its answers, and retry its refusals
//		adaptive {
//			retries         <n>           # sends after the first; default 3
//			attempt_timeout <duration>    # wait for a response to begin; default none
//			attempts_header <name>        # tells the client how many attempts it took
//		}
//
//		# per-model shorthand: a rule with id "model:<name>"
//		model <name> {
//			rps|rpm|rph|rpd|tps|tpm|tph|tpd <n> [burst <n>]
//			concurrent <n>                # requests in flight
//			applies_per <dimension...>
//			mode enforce|shadow
//			queue { max_wait <duration>  max_depth <n> }
//		}
//
//		rule <id> {
//			when {
//				subjects <user:x|team:y|virtualaccount:z ...>   # any (OR)
//				models   <model ...>                            # any (OR); trailing * is a prefix
//				metadata <key=value ...>                        # all (AND)
//			}
//			limit <n> <requests|tokens>_per_<second|minute|hour|day> [burst <n>]
//			limit <n> concurrent_requests
//			applies_per <user|team|virtualaccount|model|metadata.KEY ...>
//			mode enforce|shadow
//			queue {                       # this rule's buckets only
//				max_wait  <duration>
//				max_depth <n>
//			}
//		}
//	}
//
// Every subdirective but rule and model may appear once. rule, model and
// limit may repeat.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	once := func(name string) error {
		if seen[name] {
			return d.Errf("%s specified more than once", name)
		}
		seen[name] = true
		return nil
	}
	for d.NextBlock(0) {
		name := d.Val()
		switch name {
		case "user", "team", "virtualaccount", "metadata_header", "zone", "rules_file":
			if err := once(name); err != nil {
				return err
			}
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			switch name {
			case "user":
				h.User = v
			case "team":
				h.Team = v
			case "virtualaccount":
				h.VirtualAccount = v
			case "metadata_header":
				h.MetadataHeader = v
			case "zone":
				h.Zone = v
			case "rules_file":
				h.RulesFile = v
			}
		case "max_body":
			if err := once(name); err != nil {
				return err
			}
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n == 0 || n > maxMaxBody {
				return d.Errf("max_body: invalid size %q: want a positive size such as 16MiB", v)
			}
			h.MaxBody = int64(n)
		case "use_handle_errors":
			if err := once(name); err != nil {
				return err
			}
			if d.NextArg() {
				return d.ArgErr()
			}
			h.UseHandleErrors = true
		case "queue":
			if err := once(name); err != nil {
				return err
			}
			qc, err := parseQueueBlock(d, "queue", false)
			if err != nil {
				return err
			}
			h.Queue = qc
		case "adaptive":
			if err := once(name); err != nil {
				return err
			}
			ac, err := parseAdaptiveBlock(d)
			if err != nil {
				return err
			}
			h.Adaptive = ac
		case "store":
			if err := once(name); err != nil {
				return err
			}
			sc, err := parseStoreBlock(d)
			if err != nil {
				return err
			}
			h.Store = sc
		case "tokens":
			if err := once(name); err != nil {
				return err
			}
			tc, err := parseTokensBlock(d)
			if err != nil {
				return err
			}
			h.Tokens = tc
		case "rule":
			var id string
			if !d.AllArgs(&id) {
				return d.Errf("rule needs exactly one argument, its id")
			}
			r := Rule{ID: id}
			if err := parseRuleBlock(d, &r, false); err != nil {
				return err
			}
			h.Rules = append(h.Rules, r)
		case "model":
			var model string
			if !d.AllArgs(&model) {
				return d.Errf("model needs exactly one argument, the model name")
			}
			r := Rule{ID: "model:" + model, When: &When{Models: []string{model}}}
			if err := parseRuleBlock(d, &r, true); err != nil {
				return err
			}
			h.Rules = append(h.Rules, r)
		default:
			return d.Errf("unrecognized llm_rate_limit subdirective %q", name)
		}
	}
	// Check the rules now, so that a mistake is reported against the
	// Caddyfile rather than later against the JSON it adapts to.
	if _, err := compileRules(h.Zone, h.Rules); err != nil {
		return d.Errf("llm_rate_limit: %v", err)
	}
	if _, err := h.Tokens.compile(); err != nil {
		return d.Errf("llm_rate_limit: %v", err)
	}
	qs, err := h.Queue.compile()
	if err != nil {
		return d.Errf("llm_rate_limit: %v", err)
	}
	for i := range h.Rules {
		if _, err := rulePolicy(&h.Rules[i], qs); err != nil {
			return d.Errf("llm_rate_limit: rule %q: %v", h.Rules[i].ID, err)
		}
	}
	if _, err := h.Adaptive.compile(h.Zone, qs); err != nil {
		return d.Errf("llm_rate_limit: %v", err)
	}
	return nil
}

// parseStoreBlock parses `store memory` or `store redis [{ ... }]`.
func parseStoreBlock(d *caddyfile.Dispenser) (*StoreConfig, error) {
	var kind string
	if !d.NextArg() {
		return nil, d.Errf("store needs its kind: memory or redis")
	}
	kind = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	switch kind {
	case "memory":
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			return nil, d.Errf("store memory takes no options")
		}
		return nil, nil
	case "redis":
	default:
		return nil, d.Errf("store %q: want memory or redis", kind)
	}
	rc := &RedisConfig{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("store redis: %s specified more than once", name)
		}
		seen[name] = true
		args := d.RemainingArgs()
		one := func() (string, error) {
			if len(args) != 1 {
				return "", d.Errf("store redis: %s takes exactly one value", name)
			}
			return args[0], nil
		}
		var err error
		var v string
		switch name {
		case "address", "addresses":
			if len(args) == 0 {
				return nil, d.Errf("store redis: %s needs at least one host:port", name)
			}
			rc.Addresses = args
		case "cluster":
			if len(args) != 0 {
				return nil, d.ArgErr()
			}
			rc.Cluster = true
		case "username":
			rc.Username, err = one()
		case "password":
			rc.Password, err = one()
		case "db":
			if v, err = one(); err == nil {
				if rc.DB, err = strconv.Atoi(v); err != nil || rc.DB < 0 {
					return nil, d.Errf("store redis: db %q: want a database number", v)
				}
			}
		case "key_prefix":
			rc.KeyPrefix, err = one()
		case "timeout", "dial_timeout":
			if v, err = one(); err == nil {
				dur, perr := caddy.ParseDuration(v)
				if perr != nil || dur <= 0 {
					return nil, d.Errf("store redis: %s %q: want a positive duration such as 50ms", name, v)
				}
				if name == "timeout" {
					rc.Timeout = caddy.Duration(dur)
				} else {
					rc.DialTimeout = caddy.Duration(dur)
				}
			}
		case "pool_size":
			if v, err = one(); err == nil {
				if rc.PoolSize, err = strconv.Atoi(v); err != nil || rc.PoolSize < 1 {
					return nil, d.Errf("store redis: pool_size %q: want a positive number", v)
				}
			}
		case "fail_mode":
			if rc.FailMode, err = one(); err == nil {
				if _, ok := failModes[rc.FailMode]; !ok {
					return nil, d.Errf("store redis: fail_mode %q: want open, closed or local", rc.FailMode)
				}
			}
		case "instances":
			if v, err = one(); err == nil {
				if rc.Instances, err = strconv.ParseInt(v, 10, 64); err != nil || rc.Instances < 1 {
					return nil, d.Errf("store redis: instances %q: want a positive number", v)
				}
			}
		case "tls":
			rc.TLS = &RedisTLS{}
			if len(args) != 0 {
				return nil, d.ArgErr()
			}
			for tn := d.Nesting(); d.NextBlock(tn); {
				opt := d.Val()
				targs := d.RemainingArgs()
				switch {
				case opt == "server_name" && len(targs) == 1:
					rc.TLS.ServerName = targs[0]
				case opt == "ca_file" && len(targs) == 1:
					rc.TLS.CAFile = targs[0]
				case opt == "insecure_skip_verify" && len(targs) == 0:
					rc.TLS.InsecureSkipVerify = true
				default:
					return nil, d.Errf("store redis: tls: unrecognized option %q: want server_name <name>, ca_file <path> or insecure_skip_verify", opt)
				}
			}
		default:
			return nil, d.Errf("store redis: unrecognized option %q", name)
		}
		if err != nil {
			return nil, err
		}
	}
	if _, err := rc.resolved(nil); err != nil {
		return nil, d.Errf("llm_rate_limit: %v", err)
	}
	return &StoreConfig{Redis: rc}, nil
}

// parseAdaptiveBlock parses the adaptive block.
func parseAdaptiveBlock(d *caddyfile.Dispenser) (*AdaptiveConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	ac := &AdaptiveConfig{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("adaptive: %s specified more than once", name)
		}
		seen[name] = true
		var v string
		if !d.AllArgs(&v) {
			return nil, d.ArgErr()
		}
		switch name {
		case "retries":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > maxRetries {
				return nil, d.Errf("adaptive: retries %q: want a whole number from 0 to %d", v, maxRetries)
			}
			ac.Retries = &n
		case "attempt_timeout":
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur < 0 {
				return nil, d.Errf("adaptive: attempt_timeout %q: want a duration such as 60s", v)
			}
			ac.AttemptTimeout = caddy.Duration(dur)
		case "attempts_header":
			if !httpguts.ValidHeaderFieldName(v) {
				return nil, d.Errf("adaptive: attempts_header %q is not a valid header name", v)
			}
			ac.AttemptsHeader = v
		default:
			return nil, d.Errf("adaptive: unrecognized option %q: want retries, attempt_timeout or attempts_header", name)
		}
	}
	return ac, nil
}

// parseQueueBlock parses a queue block: the handler's, or a rule's (which
// takes max_wait and max_depth only).
func parseQueueBlock(d *caddyfile.Dispenser, what string, rule bool) (*QueueConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	qc := &QueueConfig{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("%s: %s specified more than once", what, name)
		}
		seen[name] = true
		if rule && name != "max_wait" && name != "max_depth" {
			return nil, d.Errf("%s: unrecognized option %q: a rule's queue takes max_wait and max_depth; fair_by, priority and weight belong to the handler's queue", what, name)
		}
		switch name {
		case "max_wait":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur < 0 {
				return nil, d.Errf("%s: max_wait %q: want a duration such as 30s, or 0 to refuse at once", what, v)
			}
			cd := caddy.Duration(dur)
			qc.MaxWait = &cd
		case "max_depth":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return nil, d.Errf("%s: max_depth %q: want a positive whole number", what, v)
			}
			qc.MaxDepth = n
		case "fair_by":
			qc.FairBy = d.RemainingArgs()
			if len(qc.FairBy) == 0 {
				return nil, d.Errf("%s: fair_by needs at least one dimension", what)
			}
		case "priority", "weight":
			var src string
			if !d.NextArg() {
				return nil, d.Errf("%s: %s needs a placeholder or metadata.KEY", what, name)
			}
			src = d.Val()
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			table := map[string]string{}
			for mn := d.Nesting(); d.NextBlock(mn); {
				k := d.Val()
				var v string
				if !d.AllArgs(&v) {
					return nil, d.Errf("%s: %s: want <value> <%s> per line", what, name, map[string]string{"priority": "class", "weight": "weight"}[name])
				}
				if _, dup := table[k]; dup {
					return nil, d.Errf("%s: %s: value %q given twice", what, name, k)
				}
				table[k] = v
			}
			if name == "priority" {
				qc.Priority = src
				for k, v := range table {
					n, err := strconv.Atoi(v)
					if err != nil {
						return nil, d.Errf("%s: priority class of %q: %q is not a whole number", what, k, v)
					}
					if qc.PriorityClasses == nil {
						qc.PriorityClasses = map[string]int{}
					}
					qc.PriorityClasses[k] = n
				}
			} else {
				qc.Weight = src
				for k, v := range table {
					f, err := strconv.ParseFloat(v, 64)
					if err != nil {
						return nil, d.Errf("%s: weight of %q: %q is not a number", what, k, v)
					}
					if qc.Weights == nil {
						qc.Weights = map[string]float64{}
					}
					qc.Weights[k] = f
				}
			}
		default:
			return nil, d.Errf("%s: unrecognized option %q: want max_wait, max_depth, fair_by, priority or weight", what, name)
		}
	}
	return qc, nil
}

// parseTokensBlock parses the tokens block.
func parseTokensBlock(d *caddyfile.Dispenser) (*TokenConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	tc := &TokenConfig{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if name != "model" {
			if seen[name] {
				return nil, d.Errf("tokens: %s specified more than once", name)
			}
			seen[name] = true
		}
		switch name {
		case "chars_per_token", "completion_tokens":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			if err := setEstimateOption(d, name, v, &tc.CharsPerToken, &tc.CompletionTokens); err != nil {
				return nil, err
			}
		case "oversize":
			if !d.AllArgs(&tc.Oversize) {
				return nil, d.ArgErr()
			}
			if tc.Oversize != "admit" && tc.Oversize != "reject" {
				return nil, d.Errf("tokens: oversize %q: want admit or reject", tc.Oversize)
			}
		case "stream_usage":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			tc.StreamUsage = true
		case "model":
			m := ModelTokenConfig{}
			if !d.AllArgs(&m.Match) {
				return nil, d.Errf("tokens: model needs exactly one argument, the model name or prefix*")
			}
			mn := d.Nesting()
			if !d.NextBlock(mn) {
				return nil, d.Errf("tokens: model %s: needs a block with chars_per_token or completion_tokens", m.Match)
			}
			for first := true; first || d.NextBlock(mn); first = false {
				opt := d.Val()
				var v string
				if opt != "chars_per_token" && opt != "completion_tokens" {
					return nil, d.Errf("tokens: model %s: unrecognized option %q: want chars_per_token or completion_tokens", m.Match, opt)
				}
				if !d.AllArgs(&v) {
					return nil, d.ArgErr()
				}
				if err := setEstimateOption(d, opt, v, &m.CharsPerToken, &m.CompletionTokens); err != nil {
					return nil, err
				}
			}
			tc.Models = append(tc.Models, m)
		default:
			return nil, d.Errf("tokens: unrecognized option %q: want chars_per_token, completion_tokens, oversize, stream_usage or model", name)
		}
	}
	return tc, nil
}

// setEstimateOption parses chars_per_token or completion_tokens.
func setEstimateOption(d *caddyfile.Dispenser, name, v string, cpt *float64, completion *int64) error {
	if name == "chars_per_token" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f > 0 && f <= 100) {
			return d.Errf("tokens: chars_per_token %q: want a number above 0 and at most 100", v)
		}
		*cpt = f
		return nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		return d.Errf("tokens: completion_tokens %q: want a positive whole number", v)
	}
	*completion = n
	return nil
}

// parseRuleBlock parses the body of a rule or model block.
func parseRuleBlock(d *caddyfile.Dispenser, r *Rule, shorthand bool) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	what := "rule " + r.ID
	if shorthand {
		what = "model " + strings.TrimPrefix(r.ID, "model:")
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if name != "limit" && shorthands[name] == "" {
			if seen[name] {
				return d.Errf("%s: %s specified more than once", what, name)
			}
			seen[name] = true
		}
		switch {
		case name == "when" && !shorthand:
			if d.NextArg() {
				return d.ArgErr()
			}
			r.When = &When{}
			for whenNesting := d.Nesting(); d.NextBlock(whenNesting); {
				cond := d.Val()
				args := d.RemainingArgs()
				if len(args) == 0 {
					return d.Errf("%s: when %s needs at least one value", what, cond)
				}
				switch cond {
				case "subjects":
					for _, sub := range args {
						// Keep API keys out of the adapted JSON: a
						// virtualaccount written as a key is stored as
						// its hash.
						if key, ok := strings.CutPrefix(sub, "virtualaccount:"); ok && key != "" && !strings.HasPrefix(key, "sha256:") {
							sub = "virtualaccount:sha256:" + hashAccount(key)
						}
						r.When.Subjects = append(r.When.Subjects, sub)
					}
				case "models":
					r.When.Models = append(r.When.Models, args...)
				case "metadata":
					if r.When.Metadata == nil {
						r.When.Metadata = map[string]string{}
					}
					for _, kv := range args {
						k, v, ok := strings.Cut(kv, "=")
						if !ok || k == "" {
							return d.Errf("%s: metadata %q: want key=value", what, kv)
						}
						if _, dup := r.When.Metadata[k]; dup {
							return d.Errf("%s: metadata key %q given twice", what, k)
						}
						r.When.Metadata[k] = v
					}
				default:
					return d.Errf("%s: unrecognized when condition %q: want subjects, models or metadata", what, cond)
				}
			}
		case name == "limit" && !shorthand:
			args := d.RemainingArgs()
			if len(args) != 2 && len(args) != 4 {
				return d.Errf("%s: want limit <n> <unit> [burst <n>]", what)
			}
			l, err := parseLimitArgs(d, what, args[0], args[1], args[2:])
			if err != nil {
				return err
			}
			r.Limits = append(r.Limits, l)
		case shorthand && shorthands[name] != "":
			args := d.RemainingArgs()
			if len(args) != 1 && len(args) != 3 {
				return d.Errf("%s: want %s <n> [burst <n>]", what, name)
			}
			l, err := parseLimitArgs(d, what, args[0], shorthands[name], args[1:])
			if err != nil {
				return err
			}
			r.Limits = append(r.Limits, l)
		case name == "applies_per":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Errf("%s: applies_per needs at least one dimension", what)
			}
			r.AppliesPer = args
		case name == "queue":
			qc, err := parseQueueBlock(d, what+": queue", true)
			if err != nil {
				return err
			}
			r.Queue = qc
		case name == "mode":
			var mode string
			if !d.AllArgs(&mode) {
				return d.ArgErr()
			}
			if mode != "enforce" && mode != "shadow" {
				return d.Errf("%s: mode %q: want enforce or shadow", what, mode)
			}
			r.Mode = mode
		default:
			if shorthand {
				return d.Errf("%s: unrecognized subdirective %q: want rps, rpm, rph, rpd, tps, tpm, tph, tpd, concurrent, applies_per, mode or queue", what, name)
			}
			return d.Errf("%s: unrecognized subdirective %q: want when, limit, applies_per, mode or queue", what, name)
		}
	}
	if len(r.Limits) == 0 {
		return d.Errf("%s: no limits: a rule needs at least one limit", what)
	}
	return nil
}

// parseLimitArgs parses "<n> <unit> [burst <n>]".
func parseLimitArgs(d *caddyfile.Dispenser, what, count, unit string, rest []string) (Limit, error) {
	n, err := strconv.ParseInt(count, 10, 64)
	if err != nil || n <= 0 {
		return Limit{}, d.Errf("%s: limit %q: want a positive whole number", what, count)
	}
	if _, ok := units[unit]; !ok {
		return Limit{}, d.Errf("%s: unknown unit %q: want one of %s", what, unit, unitNames())
	}
	l := Limit{LimitTo: n, Unit: unit}
	if len(rest) > 0 {
		if rest[0] != "burst" {
			return Limit{}, d.Errf("%s: unexpected %q after the unit: want burst <n>", what, rest[0])
		}
		b, err := strconv.ParseInt(rest[1], 10, 64)
		if err != nil || b <= 0 {
			return Limit{}, d.Errf("%s: burst %q: want a positive whole number", what, rest[1])
		}
		l.Burst = b
	}
	return l, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
