package tokens

import (
	"encoding/binary"
	"strconv"

	"github.com/valyala/fastjson"
)

// maxDepth bounds nesting. fastjson stops at 300 but builds an error string
// at every level on the way out, each embedding the rest of the body, which
// turns one deep body into hundreds of megabytes of garbage. Validating
// first, iteratively, with a lower bound means fastjson only ever sees input
// it accepts. Real request bodies (JSON schemas in tools included) stay far
// below 256 levels.
const maxDepth = 256

// validateJSON checks that b is exactly one strict RFC 8259 JSON value
// nested at most maxDepth levels, without recursion or allocation (except
// for the error). fastjson alone is lenient (it takes NaN, "1-2", raw
// control characters and bad escapes), and the upstream would reject such
// bodies anyway, so rejecting them here keeps the limiter's view and the
// upstream's view of a body the same. It returns the number of values, so
// that the pool can drop parsers that had to hold very large trees.
func validateJSON(b []byte) (values int, perr *ParseError) {
	var stack [maxDepth / 64]uint64 // bit set: that level is an object
	depth := 0
	i := skipWS(b, 0)
	for {
		// Expecting a value at i.
		if i >= len(b) {
			return values, syntaxErr(b, i)
		}
		values++
		switch c := b[i]; c {
		case '{', '[':
			if depth == maxDepth {
				return values, errTooDeep
			}
			if c == '{' {
				stack[depth/64] |= 1 << (depth % 64)
			} else {
				stack[depth/64] &^= 1 << (depth % 64)
			}
			depth++
			i = skipWS(b, i+1)
			if i < len(b) && (b[i] == '}' && c == '{' || b[i] == ']' && c == '[') {
				depth--
				i++
				break // an empty container is a complete value
			}
			if c == '{' {
				if i = scanKey(b, i); i < 0 {
					return values, syntaxErr(b, -i-1)
				}
			}
			continue
		case '"':
			if i = scanString(b, i+1); i < 0 {
				return values, syntaxErr(b, -i-1)
			}
		case 't':
			if i = scanLiteral(b, i, "true"); i < 0 {
				return values, syntaxErr(b, -i-1)
			}
		case 'f':
			if i = scanLiteral(b, i, "false"); i < 0 {
				return values, syntaxErr(b, -i-1)
			}
		case 'n':
			if i = scanLiteral(b, i, "null"); i < 0 {
				return values, syntaxErr(b, -i-1)
			}
		default:
			if i = scanNumber(b, i); i < 0 {
				return values, syntaxErr(b, -i-1)
			}
		}
		// A value ended at i: close containers until one continues.
		for {
			i = skipWS(b, i)
			if depth == 0 {
				if i != len(b) {
					return values, syntaxErr(b, i)
				}
				return values, nil
			}
			if i >= len(b) {
				return values, syntaxErr(b, i)
			}
			top := depth - 1
			isObj := stack[top/64]&(1<<(top%64)) != 0
			c := b[i]
			if c == ',' {
				i = skipWS(b, i+1)
				if isObj {
					if i = scanKey(b, i); i < 0 {
						return values, syntaxErr(b, -i-1)
					}
				}
				break
			}
			if isObj && c == '}' || !isObj && c == ']' {
				depth--
				i++
				continue
			}
			return values, syntaxErr(b, i)
		}
	}
}

var errTooDeep = &ParseError{Msg: "request body is not valid JSON: nested more than " + strconv.Itoa(maxDepth) + " levels deep"}

// syntaxErr reports the byte offset only: the client has the body, and
// echoing it could reflect attacker-chosen content into logs and responses.
func syntaxErr(b []byte, off int) *ParseError {
	if off >= len(b) {
		return &ParseError{Msg: "request body is not valid JSON: unexpected end of input"}
	}
	return &ParseError{Msg: "request body is not valid JSON: syntax error at byte offset " + strconv.Itoa(off)}
}

func skipWS(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// scanKey reads `"key" :` and the whitespace after it, starting at i. It
// returns the index of the value, or -(offset of the error)-1.
func scanKey(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -i - 1
	}
	if i = scanString(b, i+1); i < 0 {
		return i
	}
	i = skipWS(b, i)
	if i >= len(b) || b[i] != ':' {
		return -i - 1
	}
	return skipWS(b, i+1)
}

// strSpecial marks the bytes that end the fast path inside a string.
var strSpecial = func() (t [256]bool) {
	for c := 0; c < 0x20; c++ {
		t[c] = true
	}
	t['"'] = true
	t['\\'] = true
	return t
}()

const (
	ones  = 0x0101010101010101
	highs = 0x8080808080808080
)

// scanString scans a string body starting just after its opening quote and
// returns the index after the closing quote, or -(offset of the error)-1.
// Eight bytes are tested at a time (SWAR) because prompt text dominates
// request bodies.
func scanString(b []byte, i int) int {
	for {
		for i+8 <= len(b) {
			x := binary.LittleEndian.Uint64(b[i:])
			q := x ^ ('"' * ones)
			s := x ^ ('\\' * ones)
			// Exact "some byte is zero / below 0x20" tests.
			if ((q-ones)&^q|(s-ones)&^s|(x-0x20*ones)&^x)&highs != 0 {
				break
			}
			i += 8
		}
		for i < len(b) && !strSpecial[b[i]] {
			i++
		}
		if i >= len(b) {
			return -i - 1
		}
		switch b[i] {
		case '"':
			return i + 1
		case '\\':
			if i+1 >= len(b) {
				return -(i + 1) - 1
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) {
					return -len(b) - 1
				}
				for j := i + 2; j < i+6; j++ {
					if !isHex(b[j]) {
						return -j - 1
					}
				}
				i += 6
			default:
				return -(i + 1) - 1
			}
		default: // raw control character
			return -i - 1
		}
	}
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func scanLiteral(b []byte, i int, lit string) int {
	for j := 0; j < len(lit); j++ {
		if i+j >= len(b) || b[i+j] != lit[j] {
			return -(i + j) - 1
		}
	}
	return i + len(lit)
}

// scanNumber scans -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? and
// returns the index after it, or -(offset of the error)-1.
func scanNumber(b []byte, i int) int {
	if i < len(b) && b[i] == '-' {
		i++
	}
	if i >= len(b) {
		return -i - 1
	}
	switch {
	case b[i] == '0':
		i++
	case '1' <= b[i] && b[i] <= '9':
		i = scanDigits(b, i)
	default:
		return -i - 1
	}
	if i < len(b) && b[i] == '.' {
		j := scanDigits(b, i+1)
		if j == i+1 {
			return -j - 1
		}
		i = j
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		j := scanDigits(b, i)
		if j == i {
			return -j - 1
		}
		i = j
	}
	return i
}

func scanDigits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

// Outcomes of parseJSONInt besides success.
const (
	intOK = iota
	intFraction
	intNegative
	intRange
)

// parseJSONInt converts a number already validated by scanNumber into an
// int64. Integral values written as floats ("100.0", "1e3") are accepted,
// because Python clients and proto3 JSON produce them and upstreams take
// them; a non-zero fraction, a negative value or a value beyond int64 is
// reported instead. For intNegative the magnitude is not computed.
func parseJSONInt(s []byte) (int64, int) {
	neg := len(s) > 0 && s[0] == '-'
	if neg {
		s = s[1:]
	}
	intEnd := scanDigits(s, 0)
	intPart, frac := s[:intEnd], s[intEnd:]
	var exp int
	if len(frac) > 0 && frac[0] == '.' {
		k := scanDigits(frac, 1)
		exp = parseExp(frac[k:])
		frac = frac[1:k]
	} else {
		exp = parseExp(frac)
		frac = nil
	}
	// The digits are intPart followed by frac, scaled by 10^(exp-len(frac)).
	digit := func(k int) byte {
		if k < len(intPart) {
			return intPart[k]
		}
		return frac[k-len(intPart)]
	}
	first, end := 0, len(intPart)+len(frac)
	for first < end && digit(first) == '0' {
		first++
	}
	if first == end {
		return 0, intOK
	}
	scale := exp - len(frac)
	for digit(end-1) == '0' {
		end--
		scale++
	}
	if scale < 0 {
		return 0, intFraction
	}
	if neg {
		return 0, intNegative
	}
	if end-first+scale > 19 {
		return 0, intRange
	}
	var v uint64
	for k := first; k < end; k++ {
		v = v*10 + uint64(digit(k)-'0')
	}
	for ; scale > 0; scale-- {
		v *= 10
	}
	if v > 1<<63-1 {
		return 0, intRange
	}
	return int64(v), intOK
}

// parseExp reads an optional exponent part, saturating far beyond anything
// that could still yield an int64 so that absurd exponents cannot overflow.
func parseExp(s []byte) int {
	if len(s) == 0 || (s[0] != 'e' && s[0] != 'E') {
		return 0
	}
	s = s[1:]
	neg := false
	if len(s) > 0 && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	e := 0
	for _, c := range s {
		if e < 1_000_000_000 {
			e = e*10 + int(c-'0')
		}
	}
	if neg {
		return -e
	}
	return e
}

// The field helpers below treat JSON null as absent, as the upstreams'
// decoders do, and otherwise insist on the documented type: these fields
// drive the limits, so a value the limiter cannot read must not pass.

func fieldErr(name, what string) *ParseError {
	return &ParseError{Msg: "field \"" + name + "\" " + what}
}

// intField reads a non-negative integer. allowString accepts a decimal
// string, which proto3 JSON (Gemini) allows for integer fields. With
// negZero a negative value reads as 0 (Ollama's num_predict uses -1 for
// "unlimited"); otherwise it is an error.
func (p *Parser) intField(v *fastjson.Value, name string, allowString, negZero bool) (n int64, present bool, err error) {
	var raw []byte
	switch v.Type() {
	case fastjson.TypeNull:
		return 0, false, nil
	case fastjson.TypeNumber:
		// MarshalTo is the only allocation-free way to reach a number's
		// original text; fastjson's Int64 rejects "1e3" and Float64 rounds.
		p.scratch = v.MarshalTo(p.scratch[:0])
		raw = p.scratch
	case fastjson.TypeString:
		if !allowString {
			return 0, false, fieldErr(name, "must be an integer")
		}
		raw, _ = v.StringBytes()
		if len(raw) == 0 || scanNumber(raw, 0) != len(raw) {
			return 0, false, fieldErr(name, "must be an integer")
		}
	default:
		return 0, false, fieldErr(name, "must be an integer")
	}
	n, res := parseJSONInt(raw)
	switch res {
	case intFraction:
		return 0, false, fieldErr(name, "must be an integer")
	case intNegative:
		if negZero {
			return 0, true, nil
		}
		return 0, false, fieldErr(name, "must not be negative")
	case intRange:
		return 0, false, fieldErr(name, "is too large")
	}
	return n, true, nil
}

// boolField reads a boolean; present is false for null.
func boolField(v *fastjson.Value, name string) (b, present bool, err error) {
	switch v.Type() {
	case fastjson.TypeTrue:
		return true, true, nil
	case fastjson.TypeFalse:
		return false, true, nil
	case fastjson.TypeNull:
		return false, false, nil
	}
	return false, false, fieldErr(name, "must be a boolean")
}

// stringField reads a string, borrowing the parser's buffer.
func stringField(v *fastjson.Value, name string) ([]byte, error) {
	switch v.Type() {
	case fastjson.TypeString:
		b, _ := v.StringBytes()
		return b, nil
	case fastjson.TypeNull:
		return nil, nil
	}
	return nil, fieldErr(name, "must be a string")
}

// objectField checks that a container of limit fields is an object or null.
func objectField(v *fastjson.Value, name string) (*fastjson.Value, error) {
	switch v.Type() {
	case fastjson.TypeObject:
		return v, nil
	case fastjson.TypeNull:
		return nil, nil
	}
	return nil, fieldErr(name, "must be an object")
}

// last returns the last value under key in object v, or nil. fastjson's Get
// returns the first; upstream decoders keep the last, and counting what the
// upstream will actually read keeps duplicate keys from hiding prompt text.
func last(v *fastjson.Value, key string) *fastjson.Value {
	if v == nil || v.Type() != fastjson.TypeObject {
		return nil
	}
	var r *fastjson.Value
	v.GetObject().Visit(func(k []byte, x *fastjson.Value) {
		if string(k) == key {
			r = x
		}
	})
	return r
}

// visit calls f for each member of object v, in order; non-objects have
// none.
func visit(v *fastjson.Value, f func(k []byte, x *fastjson.Value)) {
	if v == nil || v.Type() != fastjson.TypeObject {
		return
	}
	v.GetObject().Visit(f)
}

// array returns v's elements, or nil when v is not an array.
func array(v *fastjson.Value) []*fastjson.Value {
	if v == nil || v.Type() != fastjson.TypeArray {
		return nil
	}
	return v.GetArray()
}

// isString reports whether v is the JSON string s.
func isString(v *fastjson.Value, s string) bool {
	if v == nil || v.Type() != fastjson.TypeString {
		return false
	}
	b, _ := v.StringBytes()
	return string(b) == s
}
