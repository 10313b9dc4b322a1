// Package echo is the test suite's echo service (kubegrpc.echo.v1.Echo) on the wire, shared by
// the grpc-go peers. It is hand-encoded (there is no protoc here):
//
//	service Echo {
//	  rpc Echo(EchoRequest) returns (EchoReply);
//	  rpc Stats(StatsRequest) returns (StatsReply);
//	  rpc SetHealth(SetHealthRequest) returns (SetHealthReply);
//	}
//	message EchoRequest { string message = 1; uint32 delay_ms = 2; }
//	message EchoReply { string message = 1; string backend = 2; }
//
// Messages travel as raw protobuf bytes ([]byte) through Codec.
package echo

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	// ServiceName is the echo service's full name.
	ServiceName = "kubegrpc.echo.v1.Echo"
	// EchoMethod is the full method name of Echo/Echo.
	EchoMethod = "/" + ServiceName + "/Echo"
)

// EncodeEchoRequest encodes an EchoRequest.
func EncodeEchoRequest(message string, delayMs uint32) []byte {
	request := AppendString(nil, 1, message)
	return AppendUint64(request, 2, uint64(delayMs))
}

// DecodeEchoReply decodes an EchoReply.
func DecodeEchoReply(reply []byte) (message, backend string, err error) {
	err = DecodeFields(reply, func(num protowire.Number, typ protowire.Type, value []byte, _ uint64) {
		switch {
		case num == 1 && typ == protowire.BytesType:
			message = string(value)
		case num == 2 && typ == protowire.BytesType:
			backend = string(value)
		}
	})
	if err != nil {
		return "", "", fmt.Errorf("bad EchoReply: %w", err)
	}
	return message, backend, nil
}

// DecodeFields calls field for each field of message: the value of a length-delimited field,
// or the varint; other wire types are skipped.
func DecodeFields(message []byte, field func(num protowire.Number, typ protowire.Type, value []byte, varint uint64)) error {
	for len(message) > 0 {
		num, typ, n := protowire.ConsumeTag(message)
		if n < 0 {
			return protowire.ParseError(n)
		}
		message = message[n:]
		switch typ {
		case protowire.BytesType:
			value, n := protowire.ConsumeBytes(message)
			if n < 0 {
				return protowire.ParseError(n)
			}
			field(num, typ, value, 0)
			message = message[n:]
		case protowire.VarintType:
			value, n := protowire.ConsumeVarint(message)
			if n < 0 {
				return protowire.ParseError(n)
			}
			field(num, typ, nil, value)
			message = message[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, message)
			if n < 0 {
				return protowire.ParseError(n)
			}
			message = message[n:]
		}
	}
	return nil
}

// AppendString appends a proto3 string field (omitted when empty, as proto3 encoders do).
func AppendString(b []byte, num protowire.Number, value string) []byte {
	if value == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, value)
}

// AppendUint64 appends a proto3 uint64 (or uint32) field (omitted when zero).
func AppendUint64(b []byte, num protowire.Number, value uint64) []byte {
	if value == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, value)
}

// Codec passes []byte messages (the echo service's) through untouched and gives every other
// message (the health service's, say) to grpc-go's proto codec. Named "proto", it serves the
// plain "application/grpc" content type.
type Codec struct{ proto encoding.CodecV2 }

// NewCodec returns a Codec over grpc-go's registered proto codec.
func NewCodec() Codec { return Codec{proto: encoding.GetCodecV2(proto.Name)} }

// Marshal implements encoding.CodecV2.
func (c Codec) Marshal(v any) (mem.BufferSlice, error) {
	if raw, ok := v.([]byte); ok {
		return mem.BufferSlice{mem.SliceBuffer(raw)}, nil
	}
	return c.proto.Marshal(v)
}

// Unmarshal implements encoding.CodecV2.
func (c Codec) Unmarshal(data mem.BufferSlice, v any) error {
	if raw, ok := v.(*[]byte); ok {
		*raw = data.Materialize() // a copy: data is freed when this returns
		return nil
	}
	return c.proto.Unmarshal(data, v)
}

// Name implements encoding.CodecV2.
func (Codec) Name() string { return proto.Name }
