package llmratelimit

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// StoreConfig says where bucket states live. Without it (the default) they
// live in this process's memory, which is exact for one Caddy.
type StoreConfig struct {
	// Redis keeps bucket states in a Redis (or Valkey) server that several
	// Caddy instances share, so that every limit holds across all of them.
	Redis *RedisConfig `json:"redis,omitempty"`
}

// RedisConfig configures the Redis store.
//
// Each admission is one round trip: a server-side script checks and charges
// every bucket of the request atomically, on the Redis server's clock, and
// sets expiries so that idle keys vanish. Settlements and releases are one
// round trip each, after the response has been sent.
type RedisConfig struct {
	// Addresses are the servers, as host:port. One address is a single
	// server; several are the seeds of a Redis Cluster (or set Cluster for
	// a cluster reached through one). Placeholders such as {env.REDIS_ADDR}
	// are replaced at provisioning. Default: ["127.0.0.1:6379"].
	Addresses []string `json:"addresses,omitempty"`
	// Cluster makes the client a Redis Cluster client even with a single
	// address. Default: false (a cluster only with several addresses).
	Cluster bool `json:"cluster,omitempty"`
	// Username and Password authenticate (Redis 6 ACLs, or requirepass with
	// the password alone). Placeholders such as {env.REDIS_PASSWORD} are
	// replaced at provisioning. They are never logged. Default: none.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// DB is the database number on a single server. Default: 0.
	DB int `json:"db,omitempty"`
	// TLS, when present, connects with TLS. Default: plain TCP.
	TLS *RedisTLS `json:"tls,omitempty"`
	// KeyPrefix starts every key, as the Redis Cluster hash tag
	// {KeyPrefix}: every bucket of one prefix lives in one slot, so that a
	// request's buckets are charged by one script. Instances that must share
	// limits use the same prefix; unrelated deployments on one Redis use
	// different ones. Default: "llmrl".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// Timeout bounds each store call. A call that takes longer counts as a
	// failure and gets the fail mode, so a slow or dead Redis costs a
	// request at most this much. Default: 50ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// DialTimeout bounds making a connection. Default: 1s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`
	// PoolSize is the most connections per server. Default: go-redis's, 10
	// per CPU.
	PoolSize int `json:"pool_size,omitempty"`
	// FailMode is what happens while Redis does not answer: "open" admits
	// every request (the limits are off), "closed" answers 503 (the API is
	// off), and "local" limits in this process's memory with every limit
	// divided by Instances. An outage is logged once when it starts and once
	// when it ends, never per request; the client reconnects by itself.
	// Default: "local".
	FailMode string `json:"fail_mode,omitempty"`
	// Instances is how many Caddy instances share the limits, for "local"
	// mode. Default: 1 (each instance then enforces the whole limit during
	// an outage).
	Instances int64 `json:"instances,omitempty"`
}

// RedisTLS configures TLS to Redis.
type RedisTLS struct {
	// ServerName is the name the server's certificate must have. Default:
	// the address's host.
	ServerName string `json:"server_name,omitempty"`
	// CAFile is a PEM file of the authorities to trust. Default: the
	// system's.
	CAFile string `json:"ca_file,omitempty"`
	// InsecureSkipVerify accepts any certificate. For tests only. Default:
	// false.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
}

// Defaults of RedisConfig.
const (
	defaultRedisAddress     = "127.0.0.1:6379"
	defaultRedisTimeout     = 50 * time.Millisecond
	defaultRedisDialTimeout = time.Second
	defaultRedisFailMode    = "local"
)

// warmTimeout bounds the connection and script load a new Redis store
// makes in the background.
const warmTimeout = 5 * time.Second

// failModes maps fail_mode's values to the store's modes.
var failModes = map[string]bucket.FailMode{
	"open":   bucket.FailOpen,
	"closed": bucket.FailClosed,
	"local":  bucket.FailLocal,
}

// resolved returns a copy of c with defaults set and, when repl is not nil,
// placeholders replaced, or an error for a value that cannot work. The
// Caddyfile adapter checks with a nil repl: environment variables are read
// where Caddy runs, not where its config is adapted.
func (c *RedisConfig) resolved(repl *caddy.Replacer) (RedisConfig, error) {
	r := *c
	// Only known placeholders are replaced, so that a password such as
	// "ab{cd}ef" is kept as it is.
	replace := func(v string) string {
		if repl == nil {
			return v
		}
		return repl.ReplaceKnown(v, "")
	}
	r.Addresses = make([]string, 0, len(c.Addresses))
	for _, a := range c.Addresses {
		if a = replace(a); a != "" {
			r.Addresses = append(r.Addresses, a)
		}
	}
	if len(c.Addresses) == 0 {
		r.Addresses = []string{defaultRedisAddress}
	} else if len(r.Addresses) == 0 {
		return r, errors.New("redis store: every address is empty after replacing placeholders")
	}
	r.Username = replace(c.Username)
	r.Password = replace(c.Password)
	if r.KeyPrefix == "" {
		r.KeyPrefix = bucket.DefaultRedisPrefix
	}
	if err := (bucket.RedisOptions{Prefix: r.KeyPrefix}).Validate(); err != nil {
		return r, fmt.Errorf("redis store: %w", err)
	}
	if r.Timeout == 0 {
		r.Timeout = caddy.Duration(defaultRedisTimeout)
	}
	if r.DialTimeout == 0 {
		r.DialTimeout = caddy.Duration(defaultRedisDialTimeout)
	}
	if r.Timeout < 0 || r.DialTimeout < 0 {
		return r, errors.New("redis store: timeouts must be positive")
	}
	if r.FailMode == "" {
		r.FailMode = defaultRedisFailMode
	}
	if _, ok := failModes[r.FailMode]; !ok {
		return r, fmt.Errorf("redis store: fail_mode must be open, closed or local, got %q", r.FailMode)
	}
	if r.Instances == 0 {
		r.Instances = 1
	}
	if r.Instances < 0 || r.Instances > 10000 {
		return r, fmt.Errorf("redis store: instances must be between 1 and 10000, got %d", r.Instances)
	}
	if r.DB < 0 || r.PoolSize < 0 {
		return r, errors.New("redis store: db and pool_size must not be negative")
	}
	if (r.Cluster || len(r.Addresses) > 1) && r.DB != 0 {
		return r, errors.New("redis store: a Redis Cluster has only database 0")
	}
	return r, nil
}

// poolKey names the state of this configuration in the usage pool: two
// handlers (or two loaded configurations) with the same Redis settings share
// one client, one queue and one set of learners, and a reload that keeps the
// settings keeps them. The password is part of the key only as a digest.
func (c RedisConfig) poolKey() string {
	b, _ := json.Marshal(c)
	sum := sha256.Sum256(b)
	return "llm_rate_limit/redis/" + hex.EncodeToString(sum[:16])
}

// client makes the go-redis client.
func (c RedisConfig) client() (redis.UniversalClient, error) {
	var tlsConfig *tls.Config
	if c.TLS != nil {
		tlsConfig = &tls.Config{
			MinVersion:         tls.VersionTLS12,
			ServerName:         c.TLS.ServerName,
			InsecureSkipVerify: c.TLS.InsecureSkipVerify,
		}
		if c.TLS.CAFile != "" {
			pem, err := os.ReadFile(c.TLS.CAFile)
			if err != nil {
				return nil, fmt.Errorf("redis store: reading ca_file: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("redis store: ca_file %s holds no PEM certificate", c.TLS.CAFile)
			}
			tlsConfig.RootCAs = pool
		}
	}
	timeout := time.Duration(c.Timeout)
	opts := &redis.UniversalOptions{
		Addrs:       c.Addresses,
		Username:    c.Username,
		Password:    c.Password,
		DB:          c.DB,
		TLSConfig:   tlsConfig,
		DialTimeout: time.Duration(c.DialTimeout),
		// The read and write timeouts bound a call the context would not
		// (the store's Failover bounds every call by its context too).
		ReadTimeout:           timeout,
		WriteTimeout:          timeout,
		ContextTimeoutEnabled: true,
		PoolSize:              c.PoolSize,
		// A call is bounded by Timeout, so waiting for a pooled
		// connection longer than that helps nothing.
		PoolTimeout: timeout,
		// A retry within Timeout only repeats a call that already failed;
		// the fail mode answers instead.
		MaxRetries: -1,
		// No CLIENT SETINFO: older Redis and Valkey versions log an error
		// for it.
		DisableIdentity: true,
		// The store's batches (see bucket's redisBatcher) are pipelines,
		// and go on go-redis's separate pipeline pool (the default): it
		// takes a connection without waiting (TryGet, spilling to the
		// main pool when all are busy) and has larger buffers (128 KiB).
		// Alternating wrk runs measured Caddy on Redis at 0.817 of Caddy
		// on memory with it and 0.772 with the batches on the main pool
		// (PipelinePoolSize -1). That pool dials on first use and keeps
		// no idle connection for long, so RedisStore.Warm opens one at
		// start, and a lone call goes as a pipeline of one when no batch
		// has gone for 5 minutes (bucket's redisPipelineRefresh).
	}
	if c.Cluster || len(c.Addresses) > 1 {
		return redis.NewClusterClient(opts.Cluster()), nil
	}
	return redis.NewClient(opts.Simple()), nil
}

// redisState builds the shared state of a Redis store: the client, the
// store with its fail mode, and an in-memory store for "local" mode.
func newRedisState(c RedisConfig, logger *zap.Logger) (*sharedState, error) {
	client, err := c.client()
	if err != nil {
		return nil, err
	}
	local := bucket.NewMemoryStore()
	var s *sharedState
	// The outage messages go to the latest configuration's logger, and name
	// the servers but never the credentials.
	log := func() *zap.Logger {
		return s.logger.Load().With(zap.Strings("redis", c.Addresses), zap.String("fail_mode", c.FailMode))
	}
	redisStore := bucket.NewRedisStore(client, bucket.RedisOptions{Prefix: c.KeyPrefix})
	// Connect and load the script now, in the background, bounded: a Redis
	// that is down at start is the fail mode's business on the first
	// requests, not a reason to hold the configuration back.
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), warmTimeout)
		defer cancel()
		redisStore.Warm(ctx)
	}()
	store := bucket.NewFailover(redisStore, bucket.FailoverOptions{
		Mode:      failModes[c.FailMode],
		Timeout:   time.Duration(c.Timeout),
		Local:     local,
		Instances: c.Instances,
		OnOutage: func(err error) {
			log().Error("redis store unreachable; the fail mode applies until it answers again", zap.Error(err))
		},
		OnRecover: func() { log().Info("redis store answers again") },
		// The client has ContextTimeoutEnabled: a call ends with its
		// context, so it can run inline.
		ContextBound: true,
	})
	s = newSharedState(store)
	s.shared = true
	s.closer = client.Close
	return s, nil
}
