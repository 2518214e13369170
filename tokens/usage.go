package tokens

import (
	"bytes"
	"encoding/binary"
	"strings"

	"github.com/valyala/fastjson"
)

// Usage is what a response said (or showed) about tokens, for settling the
// estimate charged when the request was admitted.
type Usage struct {
	// InputTokens is the prompt as the provider counts it, cache reads and
	// cache writes included. OpenAI's prompt_tokens and Gemini's
	// promptTokenCount already include their cached part; Anthropic's
	// input_tokens does not, so its cache_creation_input_tokens and
	// cache_read_input_tokens are added: the limiter counts every token
	// the model reads, whatever the provider bills for it. Gemini's
	// toolUsePromptTokenCount is added too, for the same reason.
	InputTokens int64
	// OutputTokens is the completion, reasoning included (Gemini's
	// thoughtsTokenCount is added to candidatesTokenCount; the other
	// providers already include it). Always 0 for embeddings.
	OutputTokens int64
	// CacheReadTokens and CacheWriteTokens are the cached parts of
	// InputTokens, for information.
	CacheReadTokens, CacheWriteTokens int64
	// Reported is true when the upstream reported usage: at least one
	// usage field was found with a valid value.
	Reported bool
	// StreamedChars and StreamedCJK count the runes, and the CJK runes
	// among them, of the completion text carried by stream events, for
	// when no usage is reported: OpenAI chat delta content, reasoning and
	// tool-call arguments, completions text, Responses text, refusal,
	// reasoning and function-argument deltas, Anthropic text, thinking and
	// input_json deltas, Gemini parts[].text and functionCall args, Ollama
	// message content, thinking and tool-call arguments, or response.
	// Text in a single (non-streamed) JSON document is not counted: every
	// provider reports usage there, and counting it would mean buffering
	// documents that can be megabytes long.
	StreamedChars, StreamedCJK int64
}

// Bounds of what a UsageScanner keeps, so that a response of any size
// costs a small, fixed amount of memory.
const (
	// maxUsageTokens caps every reported figure; larger ones are clamped.
	maxUsageTokens = 1_000_000_000_000
	// maxUnitLen is the largest SSE event, NDJSON line or element of a
	// JSON-array stream that is buffered and parsed whole. A larger one is
	// scanned as it passes, with only its usage objects captured.
	maxUnitLen = 256 << 10
	// maxCaptureLen bounds a captured usage object.
	maxCaptureLen = 8 << 10
	// keepBufLen is the buffer capacity Reset keeps for the next response;
	// larger buffers are released.
	keepBufLen = 64 << 10
)

// framing is how a response body is cut into JSON values.
type framing uint8

const (
	frameNone   framing = iota // not scanned (HTML error pages, unknown types)
	frameSSE                   // text/event-stream: one value per event
	frameNDJSON                // one value per line
	frameJSON                  // one document, or a JSON array of chunks
)

// Indexes of the raw usage fields a tally keeps.
const (
	fIn = iota
	fOut
	fCacheRead
	fCacheWrite
	fThoughts
	fToolPrompt
	fTotal
	numFields
)

// tally accumulates what the response said so far.
type tally struct {
	v          [numFields]int64
	set        uint16 // bit f: field f was reported
	chars, cjk int64
}

func (t *tally) has(f int) bool { return t.set&(1<<f) != 0 }

// UsageScanner reads token usage out of a response body as it streams to
// the client. It is fed a copy of each chunk written; it never blocks,
// never fails, never retains the chunks it is given, and keeps bounded
// memory whatever the response's size: one value of at most 256 KiB (with
// fastjson's copy and tree of it) and an 8 KiB capture.
//
// SSE events, NDJSON lines and the elements of Gemini's JSON-array stream
// are buffered (up to 256 KiB each) and parsed with the strict validator
// and fastjson once complete. A single JSON document is never buffered: a
// string-aware, depth-tracking scanner finds its top-level usage object
// (or, for Anthropic and the Responses API, message.usage and
// response.usage; for Ollama the top-level counts) and captures only those
// bytes, so that usage after megabytes of embeddings is still found and
// text that merely mentions "usage" is not mistaken for it. Events and
// lines beyond 256 KiB fall back to the same scanner. Keys written with
// escape sequences are not recognised by the scanner.
//
// When a figure is reported more than once, the last report wins
// (OpenAI's final chunk, Gemini's cumulative usageMetadata, Ollama's final
// line), except for Anthropic's input-side figures, where the largest is
// kept, since message_start and message_delta may both carry them.
//
// Values that are not integers, negative or fractional are ignored; values
// above 10^12 are clamped to it. Malformed data is ignored, never fatal.
//
// A UsageScanner is not safe for concurrent use. The zero value ignores
// everything until Reset.
type UsageScanner struct {
	d     Dialect
	ep    Endpoint
	frame framing
	t     tally

	// The value being received: buffered while it fits in maxUnitLen,
	// scanned by js (with captures) once it does not.
	unit     []byte
	unitOver bool

	js jsonScanner // captures usage from documents and oversized values
	bs jsonScanner // finds where the elements of a JSON array end

	// SSE line state.
	sse      sseState
	name     [8]byte // the field name being read
	nameLen  uint8   // may exceed len(name): the name then matches nothing
	skipLF   bool    // a \r ended the last line: skip a \n that follows
	hasData  bool    // the current event has a data field
	seenLine bool    // a line has ended (a BOM is only stripped before it)

	// JSON framing state.
	started  bool     // the first non-space byte was seen
	inArray  bool     // inside a top-level array, between elements
	inValue  bool     // inside a top-level value or array element
	valueKnd valueKnd // what that value is

	failed bool // a bug was caught: the scanner stopped

	fj       fastjson.Parser
	scratch  []byte
	bigParse bool // fj parsed a large value: drop it on Reset
}

type sseState uint8

const (
	sseLineStart  sseState = iota // at the start of a line
	sseField                      // reading a field name
	sseValueStart                 // after "data:", where one space is dropped
	sseData                       // copying a data value into the event
	sseSkip                       // ignoring the rest of the line
)

type valueKnd uint8

const (
	valueDoc     valueKnd = iota // a top-level object: scanned by js, never buffered
	valueElement                 // an object in a top-level array: buffered like an event
	valueSkip                    // anything else: only its end matters
)

// Reset prepares the scanner for one response. contentType is the
// response's Content-Type header: text/event-stream is read as SSE,
// application/x-ndjson (and the other JSON-lines types) as NDJSON, and
// application/json, text/json, any +json type or an empty header as one
// JSON document, or a JSON array of chunks (Gemini's streamGenerateContent
// without alt=sse). Anything else (an HTML error page) is ignored. The
// caller removes any Content-Encoding before feeding the scanner.
func (s *UsageScanner) Reset(d Dialect, ep Endpoint, contentType string) {
	unit, scratch, capBuf := s.unit[:0], s.scratch[:0], s.js.capBuf[:0]
	if cap(unit) > keepBufLen {
		unit = nil
	}
	if cap(scratch) > keepBufLen {
		scratch = nil
	}
	if s.bigParse {
		s.fj = fastjson.Parser{}
	}
	fj := s.fj
	*s = UsageScanner{d: d, ep: ep, frame: frameOf(contentType), unit: unit, scratch: scratch, fj: fj}
	s.js.capBuf = capBuf
	s.js.configure(d)
}

// frameOf maps a Content-Type to a framing without allocating.
func frameOf(ct string) framing {
	if i := strings.IndexByte(ct, ';'); i >= 0 {
		ct = ct[:i]
	}
	ct = strings.TrimSpace(ct)
	switch {
	case strings.EqualFold(ct, "text/event-stream"):
		return frameSSE
	case strings.EqualFold(ct, "application/x-ndjson"), strings.EqualFold(ct, "application/ndjson"),
		strings.EqualFold(ct, "application/jsonl"), strings.EqualFold(ct, "application/x-jsonlines"),
		strings.EqualFold(ct, "application/jsonlines"):
		return frameNDJSON
	case ct == "", strings.EqualFold(ct, "application/json"), strings.EqualFold(ct, "text/json"),
		len(ct) > 5 && strings.EqualFold(ct[len(ct)-5:], "+json"):
		return frameJSON
	}
	return frameNone
}

// Write observes the next chunk of the response body. It never fails and
// never retains p.
func (s *UsageScanner) Write(p []byte) (int, error) {
	if s.failed || len(p) == 0 {
		return len(p), nil
	}
	defer func() {
		// A bug must cost the usage figures, never the response.
		if recover() != nil {
			s.failed = true
		}
	}()
	switch s.frame {
	case frameSSE:
		s.writeSSE(p)
	case frameNDJSON:
		s.writeNDJSON(p)
	case frameJSON:
		s.writeJSON(p)
	}
	return len(p), nil
}

// Usage returns what the scanner has seen so far. It may be called at any
// time, e.g. after the client went away; a value still being received
// (an event without its terminating blank line, a last line without its
// newline) counts if it is already complete JSON.
func (s *UsageScanner) Usage() (u Usage) {
	t := s.t
	if !s.failed && !s.unitOver && len(s.unit) > 0 {
		func() {
			defer func() {
				if recover() != nil {
					s.failed = true
				}
			}()
			s.process(s.unit, &t)
		}()
	}
	v := &t.v
	switch s.d {
	case DialectAnthropic:
		u.InputTokens = v[fIn] + v[fCacheWrite] + v[fCacheRead]
		u.OutputTokens = v[fOut]
		u.CacheReadTokens, u.CacheWriteTokens = v[fCacheRead], v[fCacheWrite]
	case DialectGemini:
		u.InputTokens = v[fIn] + v[fToolPrompt]
		u.OutputTokens = v[fOut] + v[fThoughts]
		u.CacheReadTokens = v[fCacheRead]
	default:
		u.InputTokens, u.OutputTokens, u.CacheReadTokens = v[fIn], v[fOut], v[fCacheRead]
	}
	// Only a total: count it all as input rather than report nothing
	// (embeddings APIs that send total_tokens alone).
	if !t.has(fIn) && !t.has(fOut) && !t.has(fThoughts) && t.has(fTotal) {
		u.InputTokens = v[fTotal]
	}
	if s.ep == EndpointEmbedding {
		u.OutputTokens = 0
	}
	u.InputTokens = min(u.InputTokens, maxUsageTokens)
	u.OutputTokens = min(u.OutputTokens, maxUsageTokens)
	u.Reported = t.set != 0
	u.StreamedChars, u.StreamedCJK = t.chars, t.cjk
	return u
}

// ---- framing ----

// writeSSE splits server-sent events per the WHATWG spec: lines end in
// \r\n, \n or \r; "data" fields are joined with \n; other fields and
// comments are ignored; a blank line dispatches the event.
func (s *UsageScanner) writeSSE(p []byte) {
	i := 0
	if s.skipLF {
		s.skipLF = false
		if p[0] == '\n' {
			i = 1
		}
	}
	for i < len(p) {
		switch s.sse {
		case sseData, sseSkip:
			j := indexEOL(p[i:])
			if j < 0 {
				if s.sse == sseData {
					s.unitWrite(p[i:])
				}
				return
			}
			if s.sse == sseData {
				s.unitWrite(p[i : i+j])
			}
			i += j
		case sseValueStart:
			s.sse = sseData
			if p[i] == ' ' {
				i++
			}
			continue
		default:
			if c := p[i]; c != '\r' && c != '\n' {
				i++
				if c == ':' {
					if s.isData() {
						s.dataLine()
						s.sse = sseValueStart
					} else {
						s.sse = sseSkip
					}
					continue
				}
				if int(s.nameLen) < len(s.name) {
					s.name[s.nameLen] = c
				}
				if s.nameLen < 255 {
					s.nameLen++
				}
				s.sse = sseField
				continue
			}
		}
		// p[i] ends the line.
		s.lineEnd()
		if p[i] == '\r' {
			if i+1 == len(p) {
				s.skipLF = true
			} else if p[i+1] == '\n' {
				i++
			}
		}
		i++
	}
}

// indexEOL returns the index of the first \r or \n in b, or -1.
func indexEOL(b []byte) int {
	j := bytes.IndexByte(b, '\n')
	lim := j
	if j < 0 {
		lim = len(b)
	}
	if k := bytes.IndexByte(b[:lim], '\r'); k >= 0 {
		return k
	}
	return j
}

// isData reports whether the field name read is "data" (after a byte
// order mark on the stream's first line).
func (s *UsageScanner) isData() bool {
	name := s.name[:min(int(s.nameLen), len(s.name))]
	if int(s.nameLen) > len(s.name) {
		return false
	}
	if !s.seenLine && len(name) == 7 && string(name[:3]) == "\xEF\xBB\xBF" {
		name = name[3:]
	}
	return string(name) == "data"
}

func (s *UsageScanner) lineEnd() {
	switch s.sse {
	case sseLineStart: // a blank line dispatches the event
		if s.hasData {
			s.hasData = false
			s.unitEnd()
		}
	case sseField: // a field without a colon has an empty value
		if s.isData() {
			s.dataLine()
		}
	}
	s.sse = sseLineStart
	s.nameLen = 0
	s.seenLine = true
}

var newline = []byte{'\n'}

// dataLine starts a data line: its value is joined to the previous one
// with \n.
func (s *UsageScanner) dataLine() {
	if s.hasData {
		s.unitWrite(newline)
	}
	s.hasData = true
}

func (s *UsageScanner) writeNDJSON(p []byte) {
	for len(p) > 0 {
		j := bytes.IndexByte(p, '\n')
		if j < 0 {
			s.unitWrite(p)
			return
		}
		s.unitWrite(p[:j])
		s.unitEnd()
		p = p[j+1:]
	}
}

// writeJSON follows top-level values. A top-level object is one response
// document, scanned for its usage as it passes. A top-level array is a
// stream of chunks (Gemini), each object element handled like an event.
// Further top-level values (NDJSON served as JSON) are read the same way.
func (s *UsageScanner) writeJSON(p []byte) {
	for len(p) > 0 {
		if s.inValue {
			var n int
			var end bool
			switch s.valueKnd {
			case valueDoc:
				n, end = s.js.feed(s, p)
			case valueElement:
				n, end = s.bs.feed(s, p)
				s.unitWrite(p[:n])
				if end {
					s.unitEnd()
				}
			default:
				n, end = s.bs.feed(s, p)
			}
			p = p[n:]
			s.inValue = !end
			continue
		}
		i := 0
		for ; i < len(p); i++ {
			c := p[i]
			if !s.started {
				if isSpace(c) {
					continue
				}
				s.started = true
				if c != '{' && c != '[' {
					s.frame = frameNone // not JSON: an error page
					return
				}
			}
			if c == '{' || c == '"' || c == '[' && s.inArray {
				break
			}
			if c == '[' {
				s.inArray = true
			} else if c == ']' {
				s.inArray = false
			}
		}
		if i == len(p) {
			return
		}
		s.inValue = true
		switch {
		case p[i] == '{' && s.inArray:
			s.valueKnd = valueElement
			s.bs.reset(false)
		case p[i] == '{':
			s.valueKnd = valueDoc
			s.js.reset(true)
		default:
			s.valueKnd = valueSkip
			s.bs.reset(false)
		}
		p = p[i:]
	}
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// unitWrite appends p to the value being received, or, once the value is
// larger than maxUnitLen, scans it for usage instead of buffering it.
// Whether a value overflows depends on its length only, never on how the
// body was chunked.
func (s *UsageScanner) unitWrite(p []byte) {
	if len(p) == 0 {
		return
	}
	if s.unitOver {
		s.js.feed(s, p)
		return
	}
	if len(s.unit)+len(p) <= maxUnitLen {
		if len(s.unit)+len(p) > cap(s.unit) {
			// Grow by doubling, but never beyond the bound.
			n := make([]byte, len(s.unit), min(max(2*cap(s.unit), len(s.unit)+len(p), 512), maxUnitLen))
			copy(n, s.unit)
			s.unit = n
		}
		s.unit = append(s.unit, p...)
		return
	}
	s.unitOver = true
	s.js.reset(true)
	s.js.feed(s, s.unit)
	s.unit = s.unit[:0]
	s.js.feed(s, p)
}

// unitEnd processes the value just completed, unless it overflowed (its
// usage was then captured as it passed).
func (s *UsageScanner) unitEnd() {
	if !s.unitOver {
		s.process(s.unit, &s.t)
	}
	s.unit = s.unit[:0]
	s.unitOver = false
}

// ---- whole values ----

// process reads one complete SSE event, NDJSON line or array element
// into t. Only JSON objects that may carry usage or text are parsed.
func (s *UsageScanner) process(b []byte, t *tally) {
	if firstNonSpace(b) != '{' || !s.mayCarry(b) {
		return // [DONE], keep-alives, and events that cannot matter
	}
	// fastjson wraps its error once per nesting level, each copy holding
	// the rest of the input, so malformed input costs about depth × length
	// + 50 × depth² bytes of garbage. Values whose bracket count bounds
	// that to little (every ordinary event) go straight to fastjson, whose
	// leniency is harmless here since figures are checked by setRaw;
	// others are checked with the strict, allocation-free validator first.
	if brackets := bytes.Count(b, lbrace) + bytes.Count(b, lbracket); brackets > 16 || brackets*len(b) > 256<<10 {
		if _, perr := validateJSON(b); perr != nil {
			return
		}
	}
	v, err := s.fj.ParseBytes(b)
	if err != nil || v.Type() != fastjson.TypeObject {
		return
	}
	if len(b) > keepBufLen {
		s.bigParse = true
	}
	switch s.d {
	case DialectAnthropic:
		s.processAnthropic(v, t)
	case DialectGemini:
		s.processGemini(v, t)
	case DialectOllama:
		s.processOllama(v, t)
	default:
		s.processOpenAI(v, t)
	}
}

var lbrace, lbracket = []byte{'{'}, []byte{'['}

// mayCarry is a cheap filter for APIs whose streams are mostly events
// that matter to no one here: an event without any of these substrings
// can carry neither usage nor counted text, so it is not parsed (the
// Responses API's *.done events repeat the whole text, Anthropic sends
// pings and block starts and stops). Chat, completions, Gemini and Ollama
// chunks all carry text, so they are not filtered.
func (s *UsageScanner) mayCarry(b []byte) bool {
	switch {
	case s.d == DialectAnthropic:
		return bytes.Contains(b, []byte(`_delta"`)) || bytes.Contains(b, []byte(`"usage"`))
	case s.d == DialectGemini || s.d == DialectOllama || s.ep != EndpointResponses:
		return true
	}
	return bytes.Contains(b, []byte(`.delta"`)) || bytes.Contains(b, []byte(`"usage"`))
}

func (s *UsageScanner) processOpenAI(v *fastjson.Value, t *tally) {
	var typ, delta *fastjson.Value
	visit(v, func(k []byte, x *fastjson.Value) {
		switch string(k) {
		case "usage":
			s.applyUsage(t, x)
		case "response": // Responses API: response.completed, .incomplete, .failed
			visit(x, func(k []byte, y *fastjson.Value) {
				if string(k) == "usage" {
					s.applyUsage(t, y)
				}
			})
		case "choices":
			for _, c := range array(x) {
				visit(c, func(k []byte, y *fastjson.Value) {
					switch string(k) {
					case "text": // completions
						countString(t, y)
					case "delta": // chat
						s.countChatDelta(t, y)
					}
				})
			}
		case "type":
			typ = x
		case "delta":
			delta = x
		}
	})
	if typ != nil && delta != nil {
		b, _ := typ.StringBytes()
		switch string(b) {
		case "response.output_text.delta", "response.refusal.delta",
			"response.function_call_arguments.delta", "response.reasoning_text.delta",
			"response.reasoning_summary_text.delta":
			countString(t, delta)
		}
	}
}

// countChatDelta counts a chat chunk's delta: content, refusal,
// tool-call arguments, and the reasoning text of servers that stream it
// (reasoning_content, or reasoning where that is the only one).
func (s *UsageScanner) countChatDelta(t *tally, d *fastjson.Value) {
	var reasoning, reasoningContent *fastjson.Value
	visit(d, func(k []byte, x *fastjson.Value) {
		switch string(k) {
		case "content", "refusal":
			countString(t, x)
		case "reasoning_content":
			reasoningContent = x
		case "reasoning":
			reasoning = x
		case "tool_calls":
			for _, c := range array(x) {
				countString(t, last(last(c, "function"), "arguments"))
			}
		}
	})
	if reasoningContent != nil {
		countString(t, reasoningContent)
	} else {
		countString(t, reasoning)
	}
}

func (s *UsageScanner) processAnthropic(v *fastjson.Value, t *tally) {
	var delta *fastjson.Value
	visit(v, func(k []byte, x *fastjson.Value) {
		switch string(k) {
		case "usage": // message_delta, or a whole message
			s.applyUsage(t, x)
		case "message": // message_start
			visit(x, func(k []byte, y *fastjson.Value) {
				if string(k) == "usage" {
					s.applyUsage(t, y)
				}
			})
		case "delta":
			delta = x
		}
	})
	if delta == nil {
		return
	}
	typ := last(delta, "type")
	switch {
	case isString(typ, "text_delta"):
		countString(t, last(delta, "text"))
	case isString(typ, "input_json_delta"):
		countString(t, last(delta, "partial_json"))
	case isString(typ, "thinking_delta"):
		countString(t, last(delta, "thinking"))
	}
}

func (s *UsageScanner) processGemini(v *fastjson.Value, t *tally) {
	visit(v, func(k []byte, x *fastjson.Value) {
		switch string(k) {
		case "usageMetadata":
			s.applyUsage(t, x)
		case "candidates":
			for _, c := range array(x) {
				for _, part := range array(last(last(c, "content"), "parts")) {
					visit(part, func(k []byte, y *fastjson.Value) {
						switch string(k) {
						case "text":
							countString(t, y)
						case "functionCall":
							s.countJSON(t, last(y, "args"))
						}
					})
				}
			}
		}
	})
}

func (s *UsageScanner) processOllama(v *fastjson.Value, t *tally) {
	visit(v, func(k []byte, x *fastjson.Value) {
		switch string(k) {
		case "prompt_eval_count":
			s.setField(t, fIn, x)
		case "eval_count":
			s.setField(t, fOut, x)
		case "response", "thinking": // /api/generate
			countString(t, x)
		case "message": // /api/chat
			visit(x, func(k []byte, y *fastjson.Value) {
				switch string(k) {
				case "content", "thinking":
					countString(t, y)
				case "tool_calls":
					for _, c := range array(y) {
						s.countJSON(t, last(last(c, "function"), "arguments"))
					}
				}
			})
		}
	})
}

// applyUsage reads one usage object (usageMetadata for Gemini) into t.
func (s *UsageScanner) applyUsage(t *tally, u *fastjson.Value) {
	if u == nil || u.Type() != fastjson.TypeObject {
		return // "usage": null on OpenAI chunks before the last
	}
	switch s.d {
	case DialectAnthropic:
		visit(u, func(k []byte, x *fastjson.Value) {
			switch string(k) {
			case "input_tokens":
				s.setField(t, fIn, x)
			case "output_tokens":
				s.setField(t, fOut, x)
			case "cache_creation_input_tokens":
				s.setField(t, fCacheWrite, x)
			case "cache_read_input_tokens":
				s.setField(t, fCacheRead, x)
			}
		})
	case DialectGemini:
		visit(u, func(k []byte, x *fastjson.Value) {
			switch string(k) {
			case "promptTokenCount":
				s.setField(t, fIn, x)
			case "candidatesTokenCount":
				s.setField(t, fOut, x)
			case "thoughtsTokenCount":
				s.setField(t, fThoughts, x)
			case "cachedContentTokenCount":
				s.setField(t, fCacheRead, x)
			case "toolUsePromptTokenCount":
				s.setField(t, fToolPrompt, x)
			case "totalTokenCount":
				s.setField(t, fTotal, x)
			}
		})
	case DialectOllama:
		// Ollama reports top-level counts, read by processOllama.
	default:
		// Chat, completions and embeddings name them prompt/completion,
		// the Responses API input/output; both include cached tokens.
		visit(u, func(k []byte, x *fastjson.Value) {
			switch string(k) {
			case "prompt_tokens", "input_tokens":
				s.setField(t, fIn, x)
			case "completion_tokens", "output_tokens":
				s.setField(t, fOut, x)
			case "total_tokens":
				s.setField(t, fTotal, x)
			case "prompt_tokens_details", "input_tokens_details":
				visit(x, func(k []byte, y *fastjson.Value) {
					if string(k) == "cached_tokens" {
						s.setField(t, fCacheRead, y)
					}
				})
			}
		})
	}
}

// setField records a reported figure. Gemini's proto3 JSON may quote
// integers; elsewhere only numbers are taken.
func (s *UsageScanner) setField(t *tally, f int, x *fastjson.Value) {
	switch x.Type() {
	case fastjson.TypeNumber:
		s.scratch = x.MarshalTo(s.scratch[:0])
		setRaw(s.d, t, f, s.scratch)
	case fastjson.TypeString:
		if s.d == DialectGemini {
			b, _ := x.StringBytes()
			setRaw(s.d, t, f, b)
		}
	}
}

// setRaw records the JSON number raw as field f, unless it is not a
// non-negative integer. Anthropic's input-side figures keep their maximum;
// everything else keeps the last report.
func setRaw(d Dialect, t *tally, f int, raw []byte) {
	if len(raw) == 0 || scanNumber(raw, 0) != len(raw) {
		return
	}
	n, res := parseJSONInt(raw)
	switch res {
	case intOK:
		n = min(n, maxUsageTokens)
	case intRange:
		n = maxUsageTokens
	default: // negative or fractional
		return
	}
	if d == DialectAnthropic && f != fOut && t.has(f) {
		n = max(n, t.v[f])
	}
	t.v[f] = n
	t.set |= 1 << f
}

// countString counts v as completion text when it is a string.
func countString(t *tally, v *fastjson.Value) {
	if v == nil || v.Type() != fastjson.TypeString {
		return
	}
	b, _ := v.StringBytes()
	n, cjk := countRunes(b)
	t.chars += n
	t.cjk += cjk
}

// countJSON counts tool-call arguments: a string as it is, an object as
// the JSON text the model generated.
func (s *UsageScanner) countJSON(t *tally, v *fastjson.Value) {
	if v == nil {
		return
	}
	switch v.Type() {
	case fastjson.TypeString:
		countString(t, v)
	case fastjson.TypeObject, fastjson.TypeArray:
		s.scratch = v.MarshalTo(s.scratch[:0])
		n, cjk := countRunes(s.scratch)
		t.chars += n
		t.cjk += cjk
	}
}

// captured handles a usage object or count that js captured from a
// document or an oversized value.
func (s *UsageScanner) captured(k keyID, b []byte, obj bool) {
	if !obj {
		switch k {
		case kPromptEvalCount:
			setRaw(s.d, &s.t, fIn, b)
		case kEvalCount:
			setRaw(s.d, &s.t, fOut, b)
		}
		return
	}
	if _, perr := validateJSON(b); perr != nil {
		return
	}
	if v, err := s.fj.ParseBytes(b); err == nil {
		s.applyUsage(&s.t, v)
	}
}

// ---- streaming JSON scanner ----

// keyID names the object keys the scanner looks for.
type keyID uint8

const (
	kNone keyID = iota
	kUsage
	kUsageMetadata
	kMessage
	kResponse
	kPromptEvalCount
	kEvalCount
)

func lookupKey(b []byte) keyID {
	switch string(b) {
	case "usage":
		return kUsage
	case "usageMetadata":
		return kUsageMetadata
	case "message":
		return kMessage
	case "response":
		return kResponse
	case "prompt_eval_count":
		return kPromptEvalCount
	case "eval_count":
		return kEvalCount
	}
	return kNone
}

// jsonScanner follows one JSON value fed in arbitrary pieces, tracking
// strings and nesting only, so that it costs little more than a pass over
// the bytes. With captures on, it copies out the values of the wanted keys
// of the root object (depth 1) and of the usage key inside a wanted parent
// object (depth 2, e.g. message.usage), and hands them to the
// UsageScanner when they end. It never fails: malformed input merely
// captures nothing.
type jsonScanner struct {
	depth     int    // 0 outside the root value, 1 inside the root container
	objMask   uint64 // bit d: the container at depth d (< 64) is an object
	done      bool   // the root value ended
	inStr     bool
	esc       bool // the last byte fed was the backslash of an escape
	expectKey bool // the next string at this depth is a key

	captures   bool
	wantObj    uint16 // keys at depth 1 whose object value is captured
	wantNum    uint16 // keys at depth 1 whose number value is captured
	wantParent uint16 // keys at depth 1 whose object holds a captured "usage"

	inKey   bool
	keyBad  bool // escaped or too long: matches nothing
	keyLen  int
	key     [24]byte
	lastKey keyID // the key just read, waiting for its colon
	pending keyID // the value of this key starts at the next non-space byte
	parent  keyID // the wanted depth-1 key whose object we are in

	capObj   bool // capturing an object, which ends when depth returns to capDepth
	capNum   bool // capturing a number, which ends at the first non-number byte
	capBad   bool // the capture outgrew maxCaptureLen
	capKind  keyID
	capDepth int
	capBuf   []byte
}

// configure selects the keys wanted for d.
func (j *jsonScanner) configure(d Dialect) {
	j.wantObj, j.wantNum, j.wantParent = 0, 0, 0
	switch d {
	case DialectAnthropic:
		j.wantObj, j.wantParent = 1<<kUsage, 1<<kMessage
	case DialectGemini:
		j.wantObj = 1 << kUsageMetadata
	case DialectOllama:
		j.wantNum = 1<<kPromptEvalCount | 1<<kEvalCount
	default:
		j.wantObj, j.wantParent = 1<<kUsage, 1<<kResponse
	}
}

// reset starts a new root value, keeping the configuration and buffer.
func (j *jsonScanner) reset(captures bool) {
	*j = jsonScanner{
		captures: captures,
		wantObj:  j.wantObj, wantNum: j.wantNum, wantParent: j.wantParent,
		capBuf: j.capBuf[:0],
	}
}

// Bytes that need attention outside strings: everything else (digits,
// literals, white space) is skipped. Below depth 2 no key is looked at, so
// only strings and brackets matter there.
var (
	jsDeep    = [256]bool{'"': true, '{': true, '}': true, '[': true, ']': true}
	jsShallow = [256]bool{'"': true, '{': true, '}': true, '[': true, ']': true, ',': true, ':': true}
)

// feed scans p. It returns how many bytes belong to the root value and
// whether the root value ended within them.
func (j *jsonScanner) feed(s *UsageScanner, p []byte) (int, bool) {
	if j.done {
		return 0, true
	}
	from := 0 // where this call's part of the current capture or key starts
	i := 0
	for i < len(p) {
		if j.inStr {
			k := i
			if j.esc {
				j.esc = false
				k++
			}
			for {
				k = skipStringPlain(p, k)
				if k >= len(p) || p[k] == '"' {
					break
				}
				// A backslash: keys are compared raw, so an escaped key is
				// never one of ours.
				j.keyBad = true
				if k+1 == len(p) {
					j.esc = true
					k++
					break
				}
				k += 2
			}
			if k >= len(p) {
				if j.inKey {
					j.appendKey(p[from:])
				}
				i = len(p)
				break
			}
			// The string ends at k.
			j.inStr = false
			i = k + 1
			if j.inKey {
				j.appendKey(p[from:k])
				j.inKey = false
				if !j.keyBad {
					j.lastKey = lookupKey(j.key[:j.keyLen])
				}
			}
			if j.depth == 0 {
				j.done = true
				return i, true
			}
			continue
		}

		if j.pending == kNone && !j.capNum {
			if j.depth > 2 {
				i = skipDeep(p, i)
			} else {
				for i < len(p) && !jsShallow[p[i]] {
					i++
				}
			}
			if i == len(p) {
				break
			}
		}
		c := p[i]
		if j.pending != kNone {
			if isSpace(c) {
				i++
				continue
			}
			j.startValue(c, i, &from)
		}
		if j.capNum {
			if c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E' || '0' <= c && c <= '9' {
				i++
				continue
			}
			j.appendCap(p[from:i])
			j.capNum = false
			if !j.capBad {
				s.captured(j.capKind, j.capBuf, false)
			}
		}
		switch c {
		case '"':
			j.inStr = true
			j.inKey = j.captures && j.expectKey && (j.depth == 1 || j.depth == 2 && j.parent != kNone)
			if j.inKey {
				j.keyLen, j.keyBad = 0, false
				from = i + 1
			}
			j.expectKey = false
			j.lastKey = kNone
		case '{', '[':
			j.depth++
			if j.depth < 64 {
				if c == '{' {
					j.objMask |= 1 << j.depth
				} else {
					j.objMask &^= 1 << j.depth
				}
			}
			j.expectKey = c == '{'
			j.lastKey = kNone
		case '}', ']':
			j.lastKey = kNone
			j.expectKey = false
			if j.depth == 0 {
				break // stray
			}
			j.depth--
			if j.depth == 1 {
				j.parent = kNone
			}
			if j.capObj && j.depth == j.capDepth {
				j.appendCap(p[from : i+1])
				j.capObj = false
				if !j.capBad {
					s.captured(j.capKind, j.capBuf, true)
				}
			}
			if j.depth == 0 {
				j.done = true
				return i + 1, true
			}
		case ',':
			j.expectKey = j.depth < 64 && j.objMask&(1<<j.depth) != 0
			j.lastKey = kNone
		case ':':
			j.pending = j.lastKey
			j.lastKey = kNone
		}
		i++
	}
	if j.capObj || j.capNum {
		j.appendCap(p[from:])
	}
	return len(p), false
}

// startValue looks at the first byte c (at index i) of the value of the
// key j.pending, and starts capturing it if it is wanted.
func (j *jsonScanner) startValue(c byte, i int, from *int) {
	k := j.pending
	j.pending = kNone
	if !j.captures || j.capObj {
		return
	}
	bit := uint16(1) << k
	obj := j.depth == 1 && j.wantObj&bit != 0 || j.depth == 2 && k == kUsage && j.parent != kNone
	switch {
	case c == '{' && obj:
		j.capObj, j.capDepth = true, j.depth
	case (c == '-' || '0' <= c && c <= '9') && j.depth == 1 && j.wantNum&bit != 0:
		j.capNum = true
	case c == '{' && j.depth == 1 && j.wantParent&bit != 0:
		j.parent = k
		return
	default:
		return
	}
	j.capKind, j.capBad = k, false
	j.capBuf = j.capBuf[:0]
	*from = i
}

func (j *jsonScanner) appendKey(b []byte) {
	if j.keyBad {
		return
	}
	if j.keyLen+len(b) > len(j.key) {
		j.keyBad = true
		return
	}
	j.keyLen += copy(j.key[j.keyLen:], b)
}

func (j *jsonScanner) appendCap(b []byte) {
	if j.capBad {
		return
	}
	if len(j.capBuf)+len(b) > maxCaptureLen {
		j.capBad = true
		j.capBuf = j.capBuf[:0]
		return
	}
	j.capBuf = append(j.capBuf, b...)
}

// skipStringPlain returns the index of the first '"' or '\\' in b at or
// after i, or len(b). Eight bytes are tested at a time, as in scanString.
func skipStringPlain(b []byte, i int) int {
	for i+8 <= len(b) {
		x := binary.LittleEndian.Uint64(b[i:])
		q := x ^ ('"' * ones)
		e := x ^ ('\\' * ones)
		if ((q-ones)&^q|(e-ones)&^e)&highs != 0 {
			break
		}
		i += 8
	}
	for i < len(b) && b[i] != '"' && b[i] != '\\' {
		i++
	}
	return i
}

// skipDeep returns the index of the first quote or bracket in b at or
// after i, or len(b): all that matters below depth 2, where the bulk of a
// large document (embedding vectors) lies. x|0x20 maps '[' to '{' and ']'
// to '}', so three zero-byte tests cover the five bytes.
func skipDeep(b []byte, i int) int {
	for i+8 <= len(b) {
		x := binary.LittleEndian.Uint64(b[i:])
		y := x | 0x20*ones
		q := x ^ ('"' * ones)
		o := y ^ ('{' * ones)
		c := y ^ ('}' * ones)
		if ((q-ones)&^q|(o-ones)&^o|(c-ones)&^c)&highs != 0 {
			break
		}
		i += 8
	}
	for i < len(b) && !jsDeep[b[i]] {
		i++
	}
	return i
}
